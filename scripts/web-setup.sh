#!/usr/bin/env bash
# Prerequisites of the browser build and its tests, on Debian/Ubuntu:
#  - the wasm32-unknown-unknown Rust target;
#  - wasm-bindgen-cli at exactly the wasm-bindgen version in Cargo.lock (cargo install,
#    kept in ~/.cargo/bin and reused when the version matches);
#  - with --browser: Debian's chromium and chromium-driver (headless WebGPU on its
#    SwiftShader adapter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "web-setup: adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ] || ! command -v wasm-bindgen-test-runner >/dev/null 2>&1; then
  echo "web-setup: installing wasm-bindgen-cli $want (have: ${have:-none}; takes a few minutes once)"
  # Not --locked: the registry mirror may lack an exact version from its lock file.
  cargo install wasm-bindgen-cli --version "=$want" --force
fi

if [ "${1:-}" = "--browser" ]; then
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "web-setup: installing chromium and chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    sudo_ apt-get update -qq
    sudo_ apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
