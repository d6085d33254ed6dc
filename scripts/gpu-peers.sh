#!/usr/bin/env bash
# Issue 14's one table: kvlink, PyTorch + HF transformers and llama.cpp's CUDA backend on
# the same shapes (random weights: llama-3.2-1b, smollm2-135m), measured in one lease on
# one GPU. Runs on the GPU machine from the repo root; carry .gl, .whl, .gpu/kvlink.xz
# (a release build) and .gpu/llama-cpp-src.tar.xz (scripts/peers/stage-llama-cpp.sh).
#
#   scripts/gpu-peers.sh build   install the loaders, build llama.cpp's llama-bench (about
#                                ten minutes on 16 cores; stops before the call's limit and
#                                resumes: repeat until it says "built")
#   scripts/gpu-peers.sh run     the three engines one after another (the GPU otherwise
#                                idle), then the table; results in $OUT (or /tmp/peers):
#                                kvlink.jsonl, pytorch.jsonl, llamacpp.jsonl, table.md
#
# PEER_SHAPES (default "llama-3.2-1b smollm2-135m"), PEER_DOCS (20), PEER_DOC_LEN (512).
set -uo pipefail
phase=${1:?build or run}
D=${OUT:-/tmp/peers}
mkdir -p "$D"
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
shapes=${PEER_SHAPES:-llama-3.2-1b smollm2-135m}
docs=${PEER_DOCS:-20}; len=${PEER_DOC_LEN:-512}
K=/tmp/kvlink-peers
setup() {
    [ -x "$K" ] && return 0
    for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    xz -dc .gpu/kvlink.xz > "$K" && chmod +x "$K"
    nvidia-smi -L; "$K" devices 2>&1 | head -n 2
}
case $phase in
build)
    setup
    scripts/peers/llama-cpp-bench.sh build && echo built
    ;;
run)
    setup
    comma=$(echo $shapes | tr ' ' ',')
    : > "$D/kvlink.jsonl"
    for s in $shapes; do
        for args in "speed --prefill 512,2048 --decode 128 --decode-ctx 512 --repeats 3" \
            "ttft --docs $docs --doc-len $len --question-len 32 --repeats 5 --no-disk"; do
            # shellcheck disable=SC2086
            "$K" bench $args --random-model "$s" --json 2>>"$D/kvlink.log" |
                python3 -c "import json,sys; d=json.load(sys.stdin); d['shape']='$s'; print(json.dumps(d))" \
                >> "$D/kvlink.jsonl"
        done
    done
    python3 scripts/peers/hf_bench.py --shape "$comma" --docs "$docs" --doc-len "$len" \
        > "$D/pytorch.jsonl" 2> "$D/pytorch.log"
    # -d 0,512: each test on an empty cache and after 512 tokens ("decode 128 after 512",
    # kvlink's decode measure; "prefill N after 512" rows are llama.cpp's alone)
    scripts/peers/llama-cpp-bench.sh all --shapes "$comma" --extra "-d 0,512" \
        > "$D/llamacpp.jsonl" 2> "$D/llamacpp.log"
    python3 scripts/peers/table.py "$D"/kvlink.jsonl "$D"/pytorch.jsonl "$D"/llamacpp.jsonl |
        tee "$D/table.md"
    ;;
*) echo "phase: build or run"; exit 2 ;;
esac
