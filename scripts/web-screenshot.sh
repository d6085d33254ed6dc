#!/usr/bin/env bash
# End to end in a real browser: build the page, serve it, let headless Chromium
# (WebGPU; SwiftShader on a CPU-only machine) load the default model, add two
# documents, measure full vs KVLink TTFT and stream an answer; saves a screenshot to
# target/tmp/web/screenshot.png. Fails if the page does not answer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/web-setup.sh --browser
[ -f "$HOME/.cache/kvlink/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] || [ -n "${KVLINK_CACHE:-}" ] || scripts/fetch-model.sh
[ "${1:-}" = "--no-build" ] || scripts/web-build.sh
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory target/web/site >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 0.5
export CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
python3 scripts/web-screenshot.py "http://127.0.0.1:$port" target/tmp/web/screenshot.png "${WEB_TIMEOUT:-900}"
