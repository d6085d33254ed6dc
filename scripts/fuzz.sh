#!/usr/bin/env bash
# Fuzz kvlink's parsers of untrusted files (FUZZING.md): installs a nightly toolchain and
# cargo-fuzz if missing, builds the fuzz/ targets, then runs each for SECONDS (default
# 30) on its seed corpus (fuzz/corpus/<target>/, read only: new inputs go to a scratch
# folder). Fails on the first crash, leak, timeout or out-of-memory; the input that did
# it is left in fuzz/artifacts/<target>/ (rerun: cargo +nightly fuzz run <target> <file>).
#   scripts/fuzz.sh [SECONDS]      env: FUZZ_TARGETS="gguf kv_entry" for a subset,
#                                  FUZZ_JOBS=N to run N targets at once (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
jobs="${FUZZ_JOBS:-1}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets="${FUZZ_TARGETS:-$(cd fuzz && cargo +nightly fuzz list)}"
(cd fuzz && cargo +nightly fuzz build)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
run() {
  local t=$1
  mkdir -p "$scratch/$t"
  # -rss_limit_mb: a parser that allocates from a corrupt count trips this long before
  # the machine does. -timeout: one input may take at most 10 s.
  # TMPDIR: hf_model writes its folder there; it goes with the scratch folder.
  if (cd fuzz && TMPDIR="$scratch" cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) \
      >"$scratch/$t.log" 2>&1; then
    local runs cov
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$')
    cov=$(grep -o 'DONE *cov: [0-9]* ft: [0-9]*' "$scratch/$t.log" | tail -1 | sed 's/DONE *//')
    echo "fuzz $t: ok, 0 crashes: $runs runs in ${secs}s ($cov)"
  else
    tail -40 "$scratch/$t.log"
    echo "fuzz $t: FAILED (input in fuzz/artifacts/$t/)"
    return 1
  fi
}
fail=0
running=0
for t in $targets; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || fail=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || fail=1
  running=$((running - 1))
done
exit $fail
