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
    "$venv/bin/python" -m pip install --quiet -r train/requirements.txt
fi
[ -f "${KVLINK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvlink}/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] \
    || scripts/fetch-model.sh
cargo build --locked --quiet
export KVLINK_BIN="$PWD/target/debug/kvlink"
cd train
exec "../$venv/bin/python" -m pytest -q tests "$@"
