#!/usr/bin/env bash
# Benchmarks and a correctness check on a real GPU, from a release binary:
#   scripts/gpu-bench.sh BINARY MODEL.gguf
# Prints devices, a greedy generation, the logits of a fixed prompt (compare with
# lavapipe's), prefill/decode speed and TTFT full vs KVLink for the real model and the
# llama-3.2-1b random shape.
set -uo pipefail
B=${1:?binary}; M=${2:?model}
run() { echo; echo "### $*"; "$@" 2>&1 | grep -v XDG_RUNTIME_DIR; }
run "$B" devices
run "$B" generate --model "$M" -p "The capital of France is" --raw -n 24 --stats
run "$B" logits --model "$M" -p "The capital of France is" --raw --top 5 --json
run "$B" bench speed --model "$M" --prefill 512,2048 --decode 128 --decode-ctx 512
run "$B" bench ttft --model "$M" --docs 10 --doc-len 256 --question-len 32
run "$B" bench speed --random-model llama-3.2-1b --prefill 512,2048 --decode 128 --decode-ctx 512 --repeats 3
run "$B" bench ttft --random-model llama-3.2-1b --docs 10 --doc-len 256 --question-len 32 --repeats 3
run "$B" bench ttft --random-model llama-3.2-1b --docs 20 --doc-len 512 --question-len 32 --repeats 3
run "$B" bench ttft --random-model llama-3.2-1b --docs 10 --doc-len 512 --question-len 32 --repeats 3
