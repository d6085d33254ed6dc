#!/usr/bin/env bash
# Demo on a fresh Debian/Ubuntu machine: install prerequisites (Vulkan driver if none,
# the default model), build in release mode, and ask the default model a question.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
target/release/kvlink devices
target/release/kvlink generate --stats -n 64 \
  -p "${1:-What is the capital of France? Answer in one sentence.}"
