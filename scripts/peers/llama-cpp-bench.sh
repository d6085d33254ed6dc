#!/usr/bin/env bash
# Build llama.cpp's llama-bench (CUDA backend) from .gpu/llama-cpp-src.tar.xz
# (made by scripts/peers/stage-llama-cpp.sh) and benchmark it on random-weight
# F16 GGUFs. Runs on the GPU machine from the repo root; no network needed.
#
#   scripts/peers/llama-cpp-bench.sh [build|gguf|bench|all] [options]
#
#   build   unpack to /tmp/llama.cpp, configure, build llama-bench. Skipped when
#           the binary exists. Stops itself --build-limit seconds after the script
#           started (default 520, under the 10-minute call limit); ninja resumes
#           on the next call (exit status 3 = "run build again").
#   gguf    write /tmp/kvlink-gguf/<shape>-f16.gguf (skipped when present)
#   bench   run llama-bench and print JSON lines on stdout (logs go to stderr)
#   all     build, then gguf + bench if the build finished (default)
#
# Options:
#   --cpu              CPU-only build (build dir /tmp/llama.cpp/build-cpu), -ngl 0
#   --shapes A,B       shapes (default llama-3.2-1b,smollm2-135m; also: tiny)
#   --prompts 512,2048 prefill sizes (-p); --gen 128 (-n); --reps 3 (-r)
#   --jobs N           build parallelism (default nproc)
#   --build-limit S    seconds after the script starts at which the build stops
#                      itself (default 520; the GPU machine allows 600 per call)
#   --src FILE         source tarball (default .gpu/llama-cpp-src.tar.xz)
#   --extra "ARGS"     extra llama-bench arguments
#
# Output lines: {"engine": "llama.cpp CUDA", "shape": ..., "measure":
# "prefill 512"|"prefill 2048"|"decode 128", "value": tok/s, "unit": "tok/s",
# "stddev": ..., "build": ..., "device": ...}
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CMD=all
CPU=0
SHAPES=llama-3.2-1b,smollm2-135m
PROMPTS=512,2048
GEN=128
REPS=3
JOBS="$(nproc)"
BUILD_LIMIT=520
T_START=$(date +%s)
SRC_TAR="$ROOT/.gpu/llama-cpp-src.tar.xz"
EXTRA=""
TOP=/tmp/llama.cpp
GGUF_DIR=/tmp/kvlink-gguf

while [ $# -gt 0 ]; do
    case "$1" in
        build|gguf|bench|all) CMD="$1" ;;
        --cpu) CPU=1 ;;
        --shapes) SHAPES="$2"; shift ;;
        --prompts) PROMPTS="$2"; shift ;;
        --gen) GEN="$2"; shift ;;
        --reps) REPS="$2"; shift ;;
        --jobs) JOBS="$2"; shift ;;
        --build-limit) BUILD_LIMIT="$2"; shift ;;
        --src) SRC_TAR="$2"; shift ;;
        --extra) EXTRA="$2"; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$CPU" = 1 ]; then
    BUILD="$TOP/build-cpu"; ENGINE="llama.cpp CPU"; NGL=0
else
    BUILD="$TOP/build"; ENGINE="llama.cpp CUDA"; NGL=99
fi
BIN="$BUILD/bin/llama-bench"
log() { echo "[llama-cpp-bench] $*" >&2; }

unpack() {
    if [ ! -f "$TOP/CMakeLists.txt" ]; then
        [ -f "$SRC_TAR" ] || { log "missing $SRC_TAR (run scripts/peers/stage-llama-cpp.sh and carry .gpu/llama-cpp-src.tar.xz)"; exit 1; }
        log "unpacking $SRC_TAR -> $TOP"
        mkdir -p "$(dirname "$TOP")"
        tar -C "$(dirname "$TOP")" -xJf "$SRC_TAR"
    fi
}

do_build() {
    if [ -x "$BIN" ]; then
        log "llama-bench already built: $BIN"
        return 0
    fi
    unpack
    local t0 commit
    t0=$(date +%s)
    commit="$(head -c 8 "$TOP/KVLINK-LLAMA-CPP-COMMIT" 2>/dev/null || echo unknown)"
    if [ ! -f "$BUILD/build.ninja" ]; then
        local flags=(
            -G Ninja -S "$TOP" -B "$BUILD"
            -DCMAKE_BUILD_TYPE=Release
            -DBUILD_SHARED_LIBS=OFF
            -DGGML_NATIVE=OFF
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
            -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
            -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_SYCL=OFF -DGGML_HIP=OFF
            -DGGML_OPENCL=OFF -DGGML_RPC=OFF -DGGML_BLAS=OFF
            -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0
            -DGGML_BUILD_COMMIT="$commit" -DGGML_CCACHE=OFF
        )
        if [ "$CPU" = 1 ]; then
            flags+=(-DGGML_CUDA=OFF)
        else
            flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
                    -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_CUB_3DOT2=OFF)
            if ! command -v nvcc >/dev/null; then
                for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
                    [ -x "$d/nvcc" ] && { export PATH="$d:$PATH"; break; }
                done
            fi
            command -v nvcc >/dev/null && flags+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
        fi
        log "configure: cmake ${flags[*]}"
        cmake "${flags[@]}" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log" >&2; rm -f "$BUILD/build.ninja"; exit 1; }
        grep -E "CUDA|Using CMAKE_CUDA|CMAKE_BUILD_TYPE|ggml version|ggml commit|Including" "$BUILD.configure.log" >&2 || true
        log "configured in $(( $(date +%s) - t0 ))s"
    fi
    local total
    total="$(ninja -C "$BUILD" -n llama-bench 2>/dev/null | grep -c '^\[' || true)"
    local left=$(( BUILD_LIMIT - ($(date +%s) - T_START) ))
    [ "$left" -gt 10 ] || left=10
    log "building llama-bench: $total steps left, -j$JOBS, stopping after ${left}s if unfinished"
    local rc=0
    # ninja prints "[i/N] ..." per step; keep every 20th line plus errors on stderr
    NINJA_STATUS="[%f/%t %es] " timeout -s INT "$left" \
        ninja -C "$BUILD" -j "$JOBS" llama-bench >"$BUILD.ninja.log" 2>&1 &
    local pid=$!
    local n=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1; n=$((n + 1))
        if [ $((n % 15)) = 0 ]; then
            log "progress: $(grep -o '^\[[0-9]*/[0-9]* [0-9.]*s\]' "$BUILD.ninja.log" | tail -1) ($(( $(date +%s) - t0 ))s)"
        fi
    done
    wait "$pid" || rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "$dt" >>"$BUILD.build-seconds"
    if [ "$rc" = 0 ] && [ -x "$BIN" ]; then
        log "build done in ${dt}s this call ($(awk '{s+=$1} END {print s}' "$BUILD.build-seconds")s over all calls)"
        echo "{\"event\": \"build\", \"engine\": \"$ENGINE\", \"seconds_this_call\": $dt, \"seconds_total\": $(awk '{s+=$1} END {print s}' "$BUILD.build-seconds"), \"jobs\": $JOBS}"
        return 0
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
        log "build stopped after ${dt}s at $(grep -o '^\[[0-9]*/[0-9]* [0-9.]*s\]' "$BUILD.ninja.log" | tail -1); run 'build' again to resume"
        echo "{\"event\": \"build-incomplete\", \"engine\": \"$ENGINE\", \"seconds_this_call\": $dt}"
        return 3
    fi
    grep -E -B2 -A12 "FAILED|error" "$BUILD.ninja.log" | head -80 >&2
    log "build failed (rc=$rc); full log $BUILD.ninja.log"
    return 1
}

ensure_gguf_pkg() {
    local py="import sys, types
try:
    import yaml
except ImportError:
    sys.modules['yaml'] = types.ModuleType('yaml')
import gguf, numpy"
    if [ -d /tmp/site/gguf ] && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if python3 -c "$py" 2>/dev/null; then return 0; fi
    local whl
    whl="$(ls "$ROOT"/.whl/gguf-*.whl 2>/dev/null | tail -1 || true)"
    [ -n "$whl" ] || { log "python package gguf missing and no .whl/gguf-*.whl"; exit 1; }
    log "installing $(basename "$whl") into /tmp/site"
    mkdir -p /tmp/site
    python3 -m zipfile -e "$whl" /tmp/site
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "$py"
}

gguf_path() { echo "$GGUF_DIR/$1-f16.gguf"; }

do_gguf() {
    ensure_gguf_pkg
    local s
    for s in ${SHAPES//,/ }; do
        if [ -f "$(gguf_path "$s")" ]; then log "$(gguf_path "$s") exists"; continue; fi
        python3 "$ROOT/scripts/peers/random_gguf.py" --shape "$s" --out "$(gguf_path "$s")"
    done
}

do_bench() {
    [ -x "$BIN" ] || { log "no $BIN; run 'build' first"; exit 1; }
    local device=""
    if [ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null; then
        device="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    fi
    local s out
    for s in ${SHAPES//,/ }; do
        [ -f "$(gguf_path "$s")" ] || do_gguf_one "$s"
        out="/tmp/kvlink-llama-bench-$s$([ "$CPU" = 1 ] && echo -cpu).jsonl"
        log "bench $s: $BIN -m $(gguf_path "$s") -p $PROMPTS -n $GEN -fa 1 -ngl $NGL -r $REPS -o jsonl $EXTRA"
        # shellcheck disable=SC2086
        "$BIN" -m "$(gguf_path "$s")" -p "$PROMPTS" -n "$GEN" -fa 1 -ngl "$NGL" -r "$REPS" \
            -o jsonl $EXTRA >"$out" 2>"$out.log" || { tail -40 "$out.log" >&2; log "llama-bench failed on $s"; exit 1; }
        ENGINE="$ENGINE" SHAPE="$s" DEVICE="$device" python3 - "$out" <<'EOF'
import json, os, sys
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    npp, ngen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
    depth = int(r.get("n_depth", 0) or 0)  # tokens already in the cache (-d)
    if npp and not ngen:
        measure = f"prefill {npp}" + (f" after {depth}" if depth else "")
    elif ngen and not npp:
        measure = f"decode {ngen}" + (f" after {depth}" if depth else "")
    else:
        measure = f"prefill {npp} + decode {ngen}"
    build = str(r.get("build_commit", "unknown"))
    if int(r.get("build_number", 0) or 0):
        build = f"b{r['build_number']}-{build}"
    device = os.environ.get("DEVICE") or r.get("gpu_info") or r.get("cpu_info") or ""
    print(json.dumps({
        "engine": os.environ["ENGINE"], "shape": os.environ["SHAPE"], "measure": measure,
        "value": round(float(r["avg_ts"]), 2), "unit": "tok/s",
        "stddev": round(float(r.get("stddev_ts", 0)), 2),
        "build": build, "device": device,
        "backends": r.get("backends"), "n_gpu_layers": r.get("n_gpu_layers"),
        "flash_attn": r.get("flash_attn"), "n_batch": r.get("n_batch"),
        "n_ubatch": r.get("n_ubatch"), "type_k": r.get("type_k"), "reps": len(r.get("samples_ts", []) or []),
    }), flush=True)
EOF
    done
}

do_gguf_one() { local SHAPES="$1"; do_gguf; }

case "$CMD" in
    build) do_build ;;
    gguf) do_gguf ;;
    bench) do_bench ;;
    all)
        rc=0; do_build || rc=$?
        [ "$rc" = 0 ] || exit "$rc"
        do_gguf
        do_bench
        ;;
esac
