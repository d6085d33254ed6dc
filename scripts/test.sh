#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian/Ubuntu machine, then
# runs the whole suite on whatever wgpu adapter exists (lavapipe on a CPU-only box).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
