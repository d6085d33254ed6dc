#!/usr/bin/env bash
# The browser build's tests, in headless Chromium's WebGPU (SwiftShader on a CPU-only
# machine; Debian's chromium + chromium-driver, installed if missing):
#  1. tests/web.rs through wasm-bindgen-test: kernels vs CPU references, and the real
#     model's next-token top-10 log-probabilities vs the native engine's, which
#     `kvlink logits --json` writes to target/tmp/web/native-logits.json first;
#     and that a document cache written by the native disk store (`kvlink precompute`)
#     is imported from the browser's store (OPFS), and the one the browser writes for
#     the same document holds the same K/V;
#  2. the demo page end to end (scripts/web-screenshot.sh): load the model, add
#     documents, full vs KVLink TTFT, a streamed answer; target/tmp/web/screenshot.png.
# `--no-page` skips 2.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/web-setup.sh --browser
cache=${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$model" ] || scripts/fetch-model.sh
out=target/tmp/web
mkdir -p "$out"
# The test runner serves the repository root but not links out of it: copy the model.
if ! cmp -s "$model" "$out/model.gguf"; then cp "$model" "$out/model.gguf"; fi
prompt="The capital of France is"
cargo run --locked --quiet -- logits --model "$out/model.gguf" -p "$prompt" --raw --top 10 --json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); d["prompt"]=sys.argv[1]; json.dump(d, sys.stdout)' "$prompt" \
  > "$out/native-logits.json"
# A document cache written by the native disk store, for the browser to import.
printf '%s\n' "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889 for the World's Fair and was the tallest structure in the world until 1930." > "$out/doc.txt"
rm -rf "$out/store"
cargo run --locked --quiet -- precompute --model "$out/model.gguf" --store "$out/store" "$out/doc.txt" >/dev/null

webdriver_json=$(mktemp)
trap 'rm -f "$webdriver_json"' EXIT
cat > "$webdriver_json" <<'JSON'
{"goog:chromeOptions":{"binary":"/usr/bin/chromium","args":["--headless=new","--enable-unsafe-webgpu","--disable-gpu-sandbox","--no-sandbox","--disable-dev-shm-usage"]}}
JSON
CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver} \
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
WASM_BINDGEN_TEST_WEBDRIVER_JSON=$webdriver_json \
WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-600} \
  cargo test --locked --release --target wasm32-unknown-unknown --features web --test web -- --nocapture

[ "${1:-}" = "--no-page" ] || scripts/web-screenshot.sh
