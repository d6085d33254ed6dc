#!/usr/bin/env bash
# Run test binaries (or any command) on Mesa 26's lavapipe, which has 8x8 cooperative
# matrices (Debian 12's Mesa 22 has none), so the tensor-core kernels are checked against
# their CPU references without a GPU:
#   scripts/lavapipe-coop.sh --test kernels decode   # build and run those test binaries
#   scripts/lavapipe-coop.sh -- COMMAND ARGS...      # any command (e.g. target/release/kvlink devices)
# Mesa and the libraries it needs (the C library too: Debian unstable's is newer than the
# system's) are fetched with `apt-get download` from the Debian mirror of the system's own
# apt sources, suite unstable, and unpacked under $KVLINK_CACHE/mesa-unstable (default
# ~/.cache/kvlink); nothing is installed. Commands run through that C library's loader,
# with VK_ICD_FILENAMES naming that lavapipe and KVLINK_KERNELS=gpu (the GPU kernels).
# Where that lavapipe cannot be set up (no apt, no mirror, not x86_64, or no cooperative
# matrices in it), the script says so and exits 0 without running anything; under CI
# (CI set) it exits 1 instead, so CI never passes with these kernels untested.
set -euo pipefail
cd "$(dirname "$0")/.."
skip() {
    if [ -n "${CI:-}" ]; then echo "lavapipe-coop: cannot run under CI: $*" >&2; exit 1; fi
    echo "lavapipe-coop: skipped: $*"; exit 0
}
[ "$(uname -m)" = x86_64 ] || skip "not an x86_64 machine"
command -v apt-get >/dev/null || skip "no apt-get"
cache=${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}
D=$cache/mesa-unstable
lib=$D/root/usr/lib/x86_64-linux-gnu
if [ ! -f "$lib/libvulkan_lvp.so" ] || [ ! -f "$D/lvp.json" ]; then
  # The system's Debian mirror: the first non-security URI of its apt sources.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' | grep -v security | head -n1 || true)
  [ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1 || true)
  [ -n "$mirror" ] || skip "no Debian mirror in the apt sources"
  rm -rf "$D" && mkdir -p "$D/lists/partial" "$D/cache/archives/partial" "$D/debs" "$D/root"
  echo "deb $mirror sid main" > "$D/sources.list"
  O=(-o "Dir::Etc::sourcelist=$D/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$D/lists"
     -o "Dir::Cache=$D/cache" -o "Debug::NoLocking=1")
  echo "lavapipe-coop: fetching Mesa from Debian unstable into $D"
  apt-get "${O[@]}" update -qq >/dev/null 2>&1 || skip "apt-get update of Debian unstable failed"
  pkgs=$(apt-cache "${O[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances --no-pre-depends mesa-vulkan-drivers 2>/dev/null |
    grep -v '^[[:space:]<]' | sort -u)
  [ -n "$pkgs" ] || skip "mesa-vulkan-drivers not found in Debian unstable"
  # shellcheck disable=SC2086
  (cd "$D/debs" && apt-get "${O[@]}" download $pkgs >/dev/null 2>&1) || skip "downloading the packages failed"
  for f in "$D"/debs/*.deb; do dpkg -x "$f" "$D/root"; done
  rm -rf "$D/debs" "$D/cache"
  [ -f "$lib/libvulkan_lvp.so" ] || skip "no lavapipe in the unpacked packages"
  printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' \
    "$lib/libvulkan_lvp.so" > "$D/lvp.json"
fi
ldso=$lib/ld-linux-x86-64.so.2
[ -x "$ldso" ] || skip "no loader in the unpacked C library"
paths="$lib:$D/root/lib/x86_64-linux-gnu"
# This lavapipe has cooperative matrices and subgroups: tests that need them must run.
run() {
  KVLINK_REQUIRE=${KVLINK_REQUIRE:-coop,subgroups} VK_ICD_FILENAMES=$D/lvp.json KVLINK_KERNELS=gpu XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} \
    "$ldso" --library-path "$paths" "$@"
}
mode=${1:---}
shift || true
if [ "$mode" = --test ]; then
  [ $# -gt 0 ] || { echo "usage: $0 --test NAME... | -- COMMAND..."; exit 2; }
  cargo build --locked --bin kvlink
  # Capture first: `cmd | grep -q` would close the pipe early and, under pipefail, fail.
  devices=$(run "${CARGO_TARGET_DIR:-target}/debug/kvlink" devices 2>&1) || true
  grep -q "cooperative-matrix: true" <<<"$devices" || {
    echo "$devices" >&2; skip "this lavapipe has no cooperative matrices"; }
  out=$(cargo test --locked --no-run "${@/#/--test=}" 2>&1) || { echo "$out"; exit 1; }
  status=0
  for name in "$@"; do
    bin=$(echo "$out" | sed -n "s|.*Executable tests/$name.rs (\(.*\))|\1|p" | head -n1)
    [ -n "$bin" ] || { echo "lavapipe-coop: no test binary for tests/$name.rs"; exit 2; }
    echo "lavapipe-coop: tests/$name.rs on Mesa unstable's lavapipe (GPU kernels, tensor cores)"
    run "$bin" || status=1
  done
  exit $status
fi
[ "$mode" = -- ] || { echo "usage: $0 --test NAME... | -- COMMAND..."; exit 2; }
run "$@"
