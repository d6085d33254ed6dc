#!/usr/bin/env bash
# The official `openai` Python client against `kvlink serve` on the default model, on
# loopback: chat completions (whole and streamed), completions, multi-turn chat and the
# `documents` extension through `extra_body` (scripts/openai-client-test.py). The client
# (pinned) goes into a virtual environment under target/; the server gets a fresh
# document store of its own, removed at the end. Uses target/debug/kvlink (built if
# missing; KVLINK_BIN names another binary).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
venv=target/openai-venv
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    echo "openai-client-test: installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    sudo_ apt-get update -qq
    sudo_ apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai==3.51.0'
scripts/fetch-model.sh >/dev/null
bin=${KVLINK_BIN:-target/debug/kvlink}
[ -n "${KVLINK_BIN:-}" ] || cargo build --locked --bin kvlink
tmp=$(mktemp -d)
pid=
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
"$bin" serve --port 0 --ctx 2048 --store "$tmp/store" 2>"$tmp/log" &
pid=$!
url=
for _ in $(seq 600); do
  url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$tmp/log")
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
if [ -z "$url" ]; then
  echo "openai-client-test: the server did not start:" >&2
  cat "$tmp/log" >&2
  exit 1
fi
echo "openai-client-test: kvlink serve on $url"
if ! "$venv/bin/python" scripts/openai-client-test.py "$url/v1"; then
  echo "openai-client-test: server log:" >&2
  cat "$tmp/log" >&2
  exit 1
fi
