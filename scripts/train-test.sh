#!/usr/bin/env bash
# The trainer's tests (train/, PyTorch on the CPU): a virtual environment with
# train/requirements.txt in target/train-venv (made once, reused), then pytest, with the
# engine cross-check against the kvlink binary (debug build) and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/train-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, gguf, safetensors, pytest" 2>/dev/null; then
    echo "train-test: installing train/requirements.txt into $venv (PyTorch: a few minutes once)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # Disk is the scarce thing on CI machines: no pip cache (it would hold a second copy of
    # the ~3 GB of CUDA wheels), and PyTorch without triton (1 GB, only torch.compile uses
    # it): torch itself without its dependencies, then those dependencies less triton.
    pip=("$venv/bin/python" -m pip install --quiet --no-cache-dir)
    # (pip then reports the missing triton, and until the loop below is through torch's
    # other dependencies, as conflicts; those lines are expected.)
    grep -E '^torch\b' train/requirements.txt > "$venv/torch.txt"
    grep -vE '^torch\b' train/requirements.txt > "$venv/rest.txt"
    "${pip[@]}" --no-deps -r "$venv/torch.txt"
    "$venv/bin/python" scripts/torch-deps.py --without triton > "$venv/torch-deps.txt"
    # One requirement per pip call: pip keeps every wheel it downloaded until its call
    # ends, so one call for all of them needs the ~3 GB of CUDA wheels twice over.
    while read -r req; do
        "${pip[@]}" "$req"
    done < "$venv/torch-deps.txt"
    "${pip[@]}" -r "$venv/rest.txt"
    echo "train-test: installed ($(du -sh "$venv" | cut -f1)); disk free $(df -h . | awk 'NR == 2 { print $4 }')"
fi
[ -f "${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] \
    || scripts/fetch-model.sh
cargo build --locked --quiet
export KVLINK_BIN="$PWD/target/debug/kvlink"
cd train
exec "../$venv/bin/python" -m pytest -q tests "$@"
