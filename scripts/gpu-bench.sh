#!/usr/bin/env bash
# Benchmarks and correctness checks on a real GPU, from release binaries:
#   scripts/gpu-bench.sh KVLINK_BINARY [KERNEL_TEST_BINARY] [MODEL.gguf]
# First the kernel tests on this adapter with the GPU kernel families (every kernel
# against its CPU reference; a failure stops the run before any timing), then the
# per-kernel table (`bench kernels`: each variant checked on sampled outputs, then
# timed), then prefill/decode speed and TTFT full vs KVLink for the llama-3.2-1b and
# smollm2-135m shapes (random f16 weights: the real models run the same kernels after
# dequantizing to f16), and with MODEL a greedy generation and the logits of a fixed
# prompt (compare with lavapipe's).
set -uo pipefail
B=${1:?kvlink binary}; K=${2:-}; M=${3:-}
run() { echo; echo "### $*"; "$@" 2>&1 | grep -v XDG_RUNTIME_DIR; }
run "$B" devices
if [ -n "$K" ]; then
  echo; echo "### kernel tests (KVLINK_KERNELS=gpu)"
  KVLINK_KERNELS=gpu "$K" --test-threads 1 2>&1 | grep -E "^test |test result" || true
  KVLINK_KERNELS=gpu "$K" --test-threads 1 >/dev/null 2>&1 || { echo "kernel tests FAILED: no timings"; exit 1; }
fi
if [ -n "$M" ]; then
  run "$B" generate --model "$M" -p "The capital of France is" --raw -n 24 --stats
  run "$B" logits --model "$M" -p "The capital of France is" --raw --top 5 --json
fi
run "$B" bench kernels --shape llama-3.2-1b --rows 1,32,512,2048 --attention 512x2048,2048x2048,32x10240,32x2600
run "$B" bench speed --random-model llama-3.2-1b --prefill 512,2048 --decode 128 --decode-ctx 512 --repeats 3
run "$B" bench ttft --random-model llama-3.2-1b --docs 20 --doc-len 512 --question-len 32 --repeats 5
run "$B" bench ttft --random-model llama-3.2-1b --docs 10 --doc-len 512 --question-len 32 --repeats 5
run "$B" bench ttft --random-model llama-3.2-1b --docs 10 --doc-len 256 --question-len 32 --repeats 5
run "$B" bench speed --random-model smollm2-135m --prefill 512,2048 --decode 128 --decode-ctx 512 --repeats 3
run "$B" bench batch --random-model llama-3.2-1b --streams 1,4,16 --prompt-len 512 --decode 64
run "$B" bench ttft --random-model smollm2-135m --docs 10 --doc-len 256 --question-len 32 --repeats 5
# The batch GEMV for products of a few rows (off by default until this A/B says so).
KVLINK_GEMV_BATCH=64 run "$B" bench batch --random-model llama-3.2-1b --streams 1,4,16 --prompt-len 512 --decode 64
KVLINK_GEMV_BATCH=64 run "$B" bench ttft --random-model llama-3.2-1b --docs 20 --doc-len 512 --question-len 32 --repeats 5 --no-disk
# The portable kernels on the same adapter (no tensor cores), for the A/B.
KVLINK_COOPMAT=off run "$B" bench speed --random-model llama-3.2-1b --prefill 2048 --decode 0 --repeats 3
KVLINK_COOPMAT=off run "$B" bench ttft --random-model llama-3.2-1b --docs 20 --doc-len 512 --question-len 32 --repeats 3 --no-disk
