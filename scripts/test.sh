#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian/Ubuntu machine, then
# runs the whole suite on whatever wgpu adapter exists (lavapipe on a CPU-only box), then
# the browser build's tests (scripts/web-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
# The browser build (wasm32 + WebGPU in headless Chromium): KVLINK_SKIP_WEB=1 skips it.
[ -n "${KVLINK_SKIP_WEB:-}" ] || scripts/web-test.sh
