#!/usr/bin/env bash
# Demo on a fresh Debian/Ubuntu machine: install prerequisites (Vulkan driver if none,
# the default model), build in release mode, then answer a question over the sample
# documents in examples/docs/ with the KVLink-tuned adapter
# (adapters/smollm2-135m-kvlink): once with full prefill, then reusing the documents'
# cached KV (kvlink mode), each with its time to first token.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
B=target/release/kvlink
$B devices
q="${1:-Which engineer built both the Eiffel Tower and the Statue of Liberty's framework?}"
docs=(--doc examples/docs/eiffel-tower.txt --doc examples/docs/statue-of-liberty.txt --doc examples/docs/mount-fuji.txt)
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
for mode in full kvlink kvlink; do
  echo "== $mode"
  $B ask --lora adapters/smollm2-135m-kvlink "${docs[@]}" --store "$store" --mode $mode -n 64 -q "$q"
done
