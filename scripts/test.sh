#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian/Ubuntu machine, then
# runs the whole suite on whatever wgpu adapter exists (lavapipe on a CPU-only box), then
# the browser build's tests (scripts/web-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Tests that cannot run on this machine say so (tests/common: skip) into this log: they
# are counted and listed here; the scripts that provide those features (lavapipe-coop.sh,
# viewer-test.sh) require them, so under CI nothing goes untested.
export KVLINK_SKIP_LOG=$PWD/target/test-skips.log
# setup.sh installed redis-server: the shared cache tier's tests must run, not skip.
export KVLINK_REQUIRE=${KVLINK_REQUIRE:+$KVLINK_REQUIRE,}redis
mkdir -p target && rm -f "$KVLINK_SKIP_LOG"
cargo test --locked "$@"
echo "test: $(cat "$KVLINK_SKIP_LOG" 2>/dev/null | wc -l) tests skipped for want of a feature$([ -s "$KVLINK_SKIP_LOG" ] && echo ':')"
[ ! -s "$KVLINK_SKIP_LOG" ] || sed 's/^/  /' "$KVLINK_SKIP_LOG"
# The browser build (wasm32 + WebGPU in headless Chromium): KVLINK_SKIP_WEB=1 skips it.
[ -n "${KVLINK_SKIP_WEB:-}" ] || scripts/web-test.sh
