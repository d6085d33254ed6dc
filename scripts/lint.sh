#!/usr/bin/env bash
# Formatting and lints, as CI checks them (.ci/run, before the tests): rustfmt, clippy
# with warnings as errors on every native target with the desktop viewer, and on the
# browser library (wasm32, feature web).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
cargo fmt --all -- --check || { echo "lint: run cargo fmt" >&2; exit 1; }
cargo clippy --locked --all-targets --features viewer -- -D warnings
cargo clippy --locked --target wasm32-unknown-unknown --features web --lib -- -D warnings
echo "lint: ok"
