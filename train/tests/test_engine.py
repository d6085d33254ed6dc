"""The trainer's model is the engine's model: the real SmolLM2 GGUF with the shipped adapter,
on a KVLink prompt (documents, link tokens, markers), gives the same next-token log-probs in
`kvlink logits --json` (the engine on the local wgpu adapter, `masked` mode: one pass with
the KVLink mask) and in the trainer's fp32 forward with the adapter merged from disk.

Needs the kvlink binary (KVLINK_BIN) and the default model in the cache; scripts/train-test.sh
provides both. Without them the test is skipped, except under CI (CI=true), where a skip
would hide an untested path and fails instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvlink_train.logits import last_logprobs, load_merged  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("KVLINK_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvlink")
MODEL = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
ADAPTER = os.path.join(ROOT, "adapters", "smollm2-135m-kvlink")
BIN = os.environ.get("KVLINK_BIN", "")


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (a skip under CI would hide the engine/trainer check)")
        pytest.skip(why)


@pytest.mark.parametrize("mode", ["masked", "full"])
def test_engine_and_trainer_agree_on_the_tuned_model(tmp_path, mode):
    _need(bool(BIN) and os.path.exists(BIN), "KVLINK_BIN not set to the kvlink binary")
    _need(os.path.exists(MODEL), f"default model missing: {MODEL}")
    docs = []
    for i, text in enumerate(["The Eiffel Tower is a wrought-iron tower in Paris, France.",
                              "Mount Fuji is the highest mountain in Japan."]):
        p = tmp_path / f"d{i}.txt"
        p.write_text(text + "\n")
        docs += ["--doc", str(p)]
    out = subprocess.run([BIN, "logits", "--model", MODEL, "--lora", ADAPTER, *docs, "--no-store",
                          "-p", "In which city is the Eiffel Tower?", "--mode", mode, "--top", "10",
                          "--json"], check=True, capture_output=True, text=True).stdout
    eng = json.loads(out)
    toks, segs, pos = eng["tokens"], eng["segments"], eng["positions"]
    assert any(t >= 49152 for t in toks), "the adapter's link tokens are in the prompt"
    assert max(segs) == 2
    if mode == "full":
        segs = [0] * len(toks)  # `full` runs the same tokens with plain causal attention
    m = load_merged(MODEL, ADAPTER)
    lp = last_logprobs(m, toks, segs, pos)
    top = eng["top"]
    assert int(lp.argmax()) == top[0]["id"]
    # f16 weights and activations on the GPU against fp32 here: the engine's e2e tests see
    # 0.003-0.008 on the top-10 log-probs.
    diff = max(abs(float(lp[t["id"]]) - t["logprob"]) for t in top)
    assert diff < 0.02, f"max |d logprob| over the engine's top 10: {diff}"
