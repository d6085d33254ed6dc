#!/usr/bin/env bash
# Build the browser page and serve it on http://127.0.0.1:${PORT:-8080}/ (Ctrl-C stops).
# Open it in a browser with WebGPU (Chromium on Linux: --enable-unsafe-webgpu).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--no-build" ] || scripts/web-build.sh
port=${PORT:-8080}
echo "serving target/web/site on http://127.0.0.1:$port/"
exec python3 -m http.server "$port" --bind 127.0.0.1 --directory target/web/site
