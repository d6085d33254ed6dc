#!/usr/bin/env bash
# Stage a trimmed llama.cpp source tree (the copy vendored in the llama-cpp-python
# sdist) as .gpu/llama-cpp-src.tar.xz, for building llama-bench on a GPU machine
# that has no network. Runs on a machine with package-registry access.
#
#   scripts/peers/stage-llama-cpp.sh [VERSION]     (default 0.3.36)
#
# Keeps only what `cmake --build ... --target llama-bench` needs: top-level
# CMakeLists.txt, cmake/, ggml/ (CPU, CUDA, Vulkan, BLAS, RPC backends), src/,
# include/, common/, tools/llama-bench, the vendor/ headers common links against,
# and the licenses. tools/CMakeLists.txt and vendor/CMakeLists.txt are replaced
# by minimal ones so that only llama-bench's dependencies are configured.
# The llama.cpp commit (from the sdist's embedded git metadata) is written to
# KVLINK-LLAMA-CPP-COMMIT inside the tarball; llama-cpp-bench.sh passes it to
# CMake as LLAMA_BUILD_COMMIT so llama-bench reports it.
set -euo pipefail

VERSION="${1:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$ROOT/.gpu/llama-cpp-src.tar.xz"
mkdir -p "$ROOT/.gpu"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --no-binary for this package only: "--no-binary :all:" would also force the
# sdist's build-time dependencies (cmake, ninja, ...) to be compiled from
# source just to prepare metadata, which takes tens of minutes.
if ! pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$TMP/dl" >"$TMP/pip.log" 2>&1; then
    cat "$TMP/pip.log" >&2
    echo "llama-cpp-python==$VERSION not downloadable; trying newest 0.3.x" >&2
    pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python>=0.3,<0.4" -d "$TMP/dl" >"$TMP/pip.log" 2>&1 || { cat "$TMP/pip.log" >&2; exit 1; }
fi
SDIST="$(ls "$TMP"/dl/llama_cpp_python-*.tar.gz | head -1)"
echo "sdist: $(basename "$SDIST")"
mkdir -p "$TMP/x"
tar xzf "$SDIST" -C "$TMP/x"
PKG="$(ls -d "$TMP"/x/llama_cpp_python-* | head -1)"
SRC="$PKG/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in sdist" >&2; exit 1; }

# llama.cpp commit: the sdist ships the submodule's git dir (.git/modules/...)
COMMIT="unknown"; COMMIT_DATE=""; SUBJECT=""
if command -v git >/dev/null && git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then
    COMMIT="$(git -C "$SRC" rev-parse HEAD)"
    COMMIT_DATE="$(git -C "$SRC" log -1 --format=%cI)"
    SUBJECT="$(git -C "$SRC" log -1 --format=%s)"
fi
echo "llama.cpp commit: $COMMIT $COMMIT_DATE $SUBJECT"

ST="$TMP/stage/llama.cpp"
mkdir -p "$ST/tools" "$ST/vendor"
for f in CMakeLists.txt LICENSE AUTHORS; do
    [ -e "$SRC/$f" ] && cp -a "$SRC/$f" "$ST/"
done
for d in cmake ggml src include common licenses; do
    [ -e "$SRC/$d" ] && cp -a "$SRC/$d" "$ST/"
done
if [ -d "$SRC/tools/llama-bench" ]; then
    BENCH_DIR=tools/llama-bench
elif [ -d "$SRC/examples/llama-bench" ]; then
    BENCH_DIR=examples/llama-bench
else
    echo "llama-bench sources not found" >&2; exit 1
fi
mkdir -p "$ST/$(dirname "$BENCH_DIR")"
cp -a "$SRC/$BENCH_DIR" "$ST/$BENCH_DIR"

# minimal tools/ (or examples/) CMakeLists: llama-bench only
cat >"$ST/$(dirname "$BENCH_DIR")/CMakeLists.txt" <<'EOF'
# trimmed by scripts/peers/stage-llama-cpp.sh: llama-bench only
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
EOF
if [ "$BENCH_DIR" = examples/llama-bench ]; then
    mkdir -p "$ST/tools"; printf '# trimmed\n' >"$ST/tools/CMakeLists.txt"
fi

# vendor/: only the libraries common/ links (nlohmann, sheredom, cpp-httplib)
VENDOR_LIBS=()
for v in nlohmann sheredom cpp-httplib; do
    if [ -d "$SRC/vendor/$v" ]; then cp -a "$SRC/vendor/$v" "$ST/vendor/"; VENDOR_LIBS+=("$v"); fi
done
{
    echo "# trimmed by scripts/peers/stage-llama-cpp.sh"
    for v in "${VENDOR_LIBS[@]}"; do echo "add_subdirectory($v)"; done
} >"$ST/vendor/CMakeLists.txt"

# ggml backends that are never enabled for this build (CPU, CUDA, Vulkan, BLAS,
# RPC are kept): ggml/src/CMakeLists.txt only add_subdirectory()s a backend
# when its GGML_<NAME> option is ON, so configuring still works without them.
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu webgpu zdnn zendnn; do
    rm -rf "$ST/ggml/src/ggml-$b"
done

# drop what the build never reads
find "$ST" \( -name '*.md' -o -name '.git*' -o -name '*.py' \) -type f -delete
rm -rf "$ST/ggml/src/ggml-cuda/vendors/.git" 2>/dev/null || true

cat >"$ST/KVLINK-LLAMA-CPP-COMMIT" <<EOF
$COMMIT
EOF
cat >"$ST/KVLINK-STAGED.txt" <<EOF
llama.cpp source vendored in llama-cpp-python $(basename "$SDIST" .tar.gz | sed 's/^llama_cpp_python-//')
commit: $COMMIT
date: $COMMIT_DATE
subject: $SUBJECT
trimmed to what building llama-bench needs (tools/ and vendor/ CMakeLists.txt replaced)
EOF

rm -f "$OUT"
# deterministic-ish archive; xz -9e for size
tar -C "$TMP/stage" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime='2026-01-01 00:00:00' -cf - llama.cpp | xz -9e -T0 >"$OUT"
echo "wrote $OUT: $(du -h "$OUT" | cut -f1) ($(stat -c %s "$OUT") bytes), $(find "$ST" -type f | wc -l) files"
