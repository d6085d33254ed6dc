#!/usr/bin/env bash
# Build the browser page: the library for wasm32 (feature web), its JS bindings
# (wasm-bindgen --target web) and examples/web, into target/web/site/.
# The default model is linked into the site (models/) when it is in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/web-setup.sh
target=${CARGO_TARGET_DIR:-target}
site=target/web/site
cargo rustc --locked --release --target wasm32-unknown-unknown --features web --lib --crate-type cdylib
rm -rf "$site"
mkdir -p "$site/models"
wasm-bindgen --target web --no-typescript --out-dir "$site/pkg" \
  "$target/wasm32-unknown-unknown/release/kvlink.wasm"
cp examples/web/*.html examples/web/*.js "$site/"
cache=${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$model" ]; then
  ln -sf "$model" "$site/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
echo "web-build: $site ($(du -sh "$site/pkg" | cut -f1) of wasm + JS)"
