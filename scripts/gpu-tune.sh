#!/usr/bin/env bash
# Tuning sweeps for the KVLink question prefill and a decode A/B, on a real GPU, from
# release binaries (prints tables; no timing is asserted):
#   scripts/gpu-tune.sh KVLINK_BINARY [OLD_KVLINK_BINARY]
# With OLD, first `bench speed` (decode after 512) and `bench batch` (1 and 16 streams)
# of both binaries, alternating (AB_ROUNDS="1 2": twice). Then, for the 32-row question of a 20 x 512
# KVLink request on the llama-3.2-1b shape: every tensor-core tile of SWEEP_TILES with
# forced split-K factors (`bench kernels --splits`), the flash attention over 10,240 keys
# under each KVLINK_FLASH_SPLITS and KVLINK_FLASH_LAYOUT, and `bench ttft` under the
# settings of TTFT_ENVS. Each variant is checked against the CPU before it is timed.
set -uo pipefail
B=${1:?kvlink binary}; OLD=${2:-}
TILES=${SWEEP_TILES:-"1,4,2,2vw;1,4,2,1vw;2,4,1,2vw;1,16,2,1vw"}
SPLITS=${SWEEP_SPLITS:-1,4,8,16,32,64}
run() { echo; echo "### $*"; "$@" 2>&1 | grep -v XDG_RUNTIME_DIR; }
ttft() { "$@" bench ttft --random-model llama-3.2-1b --docs 20 --doc-len 512 --question-len 32 \
    --repeats 5 --no-disk 2>&1 | grep -iE "kvlink|full|prefill|assembly" | head -n 8; }
"$B" devices 2>&1 | head -n 3
if [ -n "$OLD" ]; then
  for round in ${AB_ROUNDS:-1}; do
    for b in "$OLD" "$B"; do
      echo; echo "### round $round: $b"
      "$b" bench speed --random-model llama-3.2-1b --prefill 512 --decode 128 --decode-ctx 512 \
        --repeats 3 2>&1 | grep -iE "decode|prefill" | head -n 6
      "$b" bench batch --random-model llama-3.2-1b --streams 1,16 --prompt-len 512 --decode 64 \
        2>&1 | grep -vE "^\s*$|XDG" | tail -n 6
    done
  done
fi
run "$B" bench kernels --shape llama-3.2-1b --rows 32 --attention 32x10240 \
  --coop-tiles "$TILES" --splits "$SPLITS"
for s in 4 8 32 64; do
  echo; echo "### KVLINK_FLASH_SPLITS=$s"
  KVLINK_FLASH_SPLITS=$s "$B" bench kernels --shape llama-3.2-1b --rows 1 --attention 32x10240 \
    2>&1 | grep -E "^\| 32 \| 10240"
done
for l in 2,4 4,2 8,2 4,8; do
  echo; echo "### KVLINK_FLASH_LAYOUT=$l"
  KVLINK_FLASH_LAYOUT=$l "$B" bench kernels --shape llama-3.2-1b --rows 1 --attention 32x10240 \
    2>&1 | grep -E "^\| 32 \| 10240|rror"
done
# Prefill 512 costs ~34 ms against ~55 ms for 2048: GPU time per kernel against the wall.
for n in 512 2048; do  # 4 runs each (1 warm-up, 3 timed): GPU total / 4 against the wall's median
  run env KVLINK_PROFILE=1 "$B" bench speed --random-model llama-3.2-1b --prefill $n --decode 0 --repeats 3
done
echo; echo "### bench ttft 20 x 512 + 32, GPU caches (default, then each of TTFT_ENVS)"
ttft "$B"
for e in ${TTFT_ENVS:-KVLINK_COOP_SPLITS=8 KVLINK_COOP_SPLITS=16 KVLINK_FLASH_SPLITS=8 KVLINK_FLASH_SPLITS=32}; do
  echo "--- $e"; ttft env "$e" "$B"
done
