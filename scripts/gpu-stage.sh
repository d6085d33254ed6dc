#!/usr/bin/env bash
# Stage, from a fresh checkout, what the lent GPU machine needs for scripts/gpu-train.sh
# and scripts/gpu-bench.sh (it has the NVIDIA driver, PyTorch and numpy; no Vulkan loader,
# no Rust, no network). Everything goes into git-ignored folders that device calls carry:
#   .gl/   the Vulkan loader packages (Debian amd64 .debs, extracted there by `setup`)
#   .whl/  the gguf Python package (the trainer's GGUF reader), installed by `setup`
#   .gpu/  kvlink.xz          release build of this tree
#          model.part1..N     SmolLM2-135M-Instruct Q4_1 GGUF (scripts/fetch-model.sh) in
#                             parts that fill what the working tree leaves of the 64 MiB a
#                             call carries (the first beside the loaders, binary and data)
#          data.tar.xz        hqa500.json (HotpotQA 0-499, test), hqa-val.json (500-999,
#                             validation), squad-v2-dev.json, wiki.utf8, ppl-heldout.utf8
#                             (the held-out SQuAD articles: a perplexity text never trained on)
#          samples20.safetensors.xz  training samples of the shipped adapter's first three
#                             stages, samples.safetensors.xz of its fourth, samples40 of its
#                             fifth and sixth (`gpu-train.sh chain`)
#          probe.safetensors.xz    a small sample file for setup's throughput probe
# Usage: scripts/gpu-stage.sh [--no-build] [--no-samples]
#   --no-build    keep .gpu/kvlink.xz if present (else build it)
#   --no-samples  skip the training samples (benchmark- or evaluation-only leases)
# Environment: MIX, TOKENS, SEED, QA_PASSES for the samples (default: the 1,350-step recipe).
set -euo pipefail
build=1 samples=1
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        --no-samples) samples=0 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
for d in /.gl/ /.whl/ /.gpu/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
cache="${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}"
mkdir -p .gl .whl .gpu

echo "== Vulkan loader packages (.gl)"
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    lists=$(mktemp -d)
    o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists -oAPT::Sandbox::User=root"
    mkdir -p "$lists/partial"
    apt-get $o update >/dev/null
    (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null 2>&1)
    rm -rf "$lists"
fi
echo "== gguf wheel (.whl)"
ls .whl/gguf-*.whl >/dev/null 2>&1 || python3 -m pip download --no-deps --quiet gguf -d .whl

echo "== evaluation and training data"
scripts/fetch-train-data.sh
data="$cache/data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$data/hotpotqa.json" "$tmp" <<'PY'
import json, sys
q = json.load(open(sys.argv[1]))
json.dump(q[:500], open(sys.argv[2] + "/hqa500.json", "w"))
json.dump(q[500:1000], open(sys.argv[2] + "/hqa-val.json", "w"))
PY
# A perplexity text no adapter trained on (wiki.utf8 is also a training source): the
# paragraphs of the five SQuAD articles `kvlink train-data` holds out (EVAL.md), as
# WikiExtractor articles (~22k tokens).
python3 - "$data/squad-v2-dev.json" "$tmp/ppl-heldout.utf8" <<'PY'
import json, sys
held = ["Normans", "Jacksonville,_Florida", "Construction",
        "Intergovernmental_Panel_on_Climate_Change", "Packet_switching"]
arts = [a for a in json.load(open(sys.argv[1]))["data"] if a["title"] in held]
assert len(arts) == len(held), [a["title"] for a in arts]
with open(sys.argv[2], "w") as f:
    for a in arts:
        f.write(f'<doc title="{a["title"]}">\n' + "\n\n".join(p["context"] for p in a["paragraphs"]) + "\n</doc>\n")
PY
cp "$data/squad-v2-dev.json" "$data/wiki.utf8" "$tmp/"
tar -cJf .gpu/data.tar.xz -C "$tmp" hqa500.json hqa-val.json squad-v2-dev.json wiki.utf8 ppl-heldout.utf8

if [ "$build" = 1 ] || [ ! -f .gpu/kvlink.xz ]; then
    echo "== release build"
    cargo build --release --quiet
    xz -T0 -c target/release/kvlink > .gpu/kvlink.xz
fi
bin=target/release/kvlink
[ -x "$bin" ] || bin="cargo run --release --quiet --"

echo "== model parts"
scripts/fetch-model.sh
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -f .gpu/model.part*
# Each call carries the working tree too (tracked files), so the parts fill what it
# leaves of 64 MiB, less 1 MB: the first beside the loaders, wheel, binary and data.
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{ s += $1 } END { print s }')
room=$((64 * 1024 * 1024 - 1000000 - tree))
first=$((room - $(cat .gl/* .whl/* .gpu/kvlink.xz .gpu/data.tar.xz | wc -c)))
[ "$first" -gt 1000000 ] || { echo "gpu-stage: the working tree ($tree bytes) leaves no room for the model" >&2; exit 1; }
head -c "$first" "$model" > .gpu/model.part1
tail -c +$((first + 1)) "$model" | split -b "$room" --numeric-suffixes=2 -a 1 - .gpu/model.part
parts=$(ls .gpu/model.part* | wc -l)

if [ "$samples" = 1 ]; then
    echo "== training samples"
    $bin train-data --out "$tmp/samples.safetensors" --tokens "${TOKENS:-30000000}" \
        --mix "${MIX:-qa_mem=40,qa=15,sft_mem=12,sft=8,text_mem=17,text=8}" --seed "${SEED:-0}" \
        --qa-passes "${QA_PASSES:-1}"
    xz -T0 -c "$tmp/samples.safetensors" > .gpu/samples.safetensors.xz
    $bin train-data --out "$tmp/samples20.safetensors"
    xz -T0 -c "$tmp/samples20.safetensors" > .gpu/samples20.safetensors.xz
    $bin train-data --out "$tmp/samples40.safetensors" --tokens 40000000 --qa-passes 3 --seed 4 \
        --mix qa_mem=50,qa=15,sft_mem=10,sft=5,text_mem=15,text=5
    xz -T0 -c "$tmp/samples40.safetensors" > .gpu/samples40.safetensors.xz
    $bin train-data --out "$tmp/probe.safetensors" --tokens 400000 --seed 1
    xz -T0 -c "$tmp/probe.safetensors" > .gpu/probe.safetensors.xz
fi

echo "== staged (each call carries at most 64 MiB; the working tree takes $tree bytes)"
du -ch .gl .whl .gpu/* | sed 's/^/  /'
echo "A training lease (train/README.md), each call made at once after the last:"
echo "  carry .gl .whl .gpu/model.part1 .gpu/kvlink.xz .gpu/data.tar.xz   PROBE=0 scripts/gpu-train.sh setup"
for i in $(seq 2 $((parts - 1))); do
    echo "  carry .gpu/model.part$i   scripts/gpu-train.sh stash .gpu/model.part$i"
done
last=.gpu/model.part$parts
if [ $(($(wc -c < "$last") + $(wc -c < .gpu/samples40.safetensors.xz 2>/dev/null || echo "$room"))) -le "$room" ]; then
    echo "  carry $last .gpu/samples40.safetensors.xz   EVALS=none scripts/gpu-train.sh model && ... train"
else
    echo "  carry $last   EVALS=none scripts/gpu-train.sh model"
    echo "  carry .gpu/<samples>.safetensors.xz   RUNS=... STEPS=... scripts/gpu-train.sh train"
fi
echo "  the matched control: scripts/gpu-train.sh chain (train/README.md: two leases)"
echo "A benchmark lease: carry .gl and the release binaries, scripts/gpu-bench.sh BINARY."
