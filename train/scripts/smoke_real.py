"""Smoke check on the real model (not a test): next-token check, then 3 CPU training steps and export.

PYTHONPATH=train python train/scripts/smoke_real.py [MODEL.gguf] [--tokens N] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvlink_train.data import write_samples  # noqa: E402
from kvlink_train.logits import last_logprobs, load_merged  # noqa: E402
from kvlink_train.train import main as train_main  # noqa: E402

DEFAULT = os.path.expanduser("~/.cache/kvlink/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def synthetic(path: str, n: int, length: int, base_vocab: int = 49152, k: int = 5, slots: int = 40,
              all_loss: bool = False) -> None:
    rng = np.random.default_rng(0)
    kv = {"k": k, "link_base": base_vocab, "kv_start": base_vocab + k * slots, "kv_end": base_vocab + k * slots + 1,
          "max_slots": slots}
    ss = []
    for i in range(n):
        toks, segs, loss = [1], [0], [0]
        toks.append(kv["kv_start"]); segs.append(0); loss.append(0)
        n_docs = 10
        doc_len = (length * 3 // 4) // n_docs - k
        for j in range(n_docs):
            toks += list(rng.integers(100, base_vocab, doc_len)); segs += [j + 1] * doc_len; loss += [0] * doc_len
            toks += [base_vocab + k * j + t for t in range(k)]; segs += [0] * k; loss += [0] * k
        toks.append(kv["kv_end"]); segs.append(0); loss.append(0)
        rest = length - len(toks)
        toks += list(rng.integers(100, base_vocab, rest)); segs += [0] * rest
        loss += [0] * (rest // 2) + [1] * (rest - rest // 2)
        if all_loss:
            loss = [1] * len(toks)
        ss.append({"tokens": toks, "segments": segs, "positions": list(range(len(toks))), "loss": loss,
                   "component": 0})
    write_samples(path, ss, ["qa_mem", "qa"], base_vocab, json.dumps(kv))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=DEFAULT)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    t = time.time()
    m = load_merged(a.model)
    load_s = time.time() - t
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    lp = last_logprobs(m, ids, [0] * 5, list(range(5)))
    v, i = lp.topk(5)
    print(json.dumps({"load_s": round(load_s, 2), "prompt": ids,
                      "top5": [[int(b), round(float(x), 4)] for x, b in zip(v, i)],
                      "paris_7042_logprob": round(float(lp[7042]), 4)}), flush=True)
    del m
    d = tempfile.mkdtemp()
    sp = os.path.join(d, "samples.safetensors")
    synthetic(sp, n=4 * a.batch_tokens // a.length, length=a.length)
    run = os.path.join(d, "run")
    train_main(["--model", a.model, "--samples", sp, "--run", run, "--steps", str(a.steps), "--warmup", "1",
                "--batch-tokens", str(a.batch_tokens), "--device", "cpu"])
    sz = os.path.getsize(os.path.join(run, "adapter", "adapter_model.safetensors"))
    print(json.dumps({"adapter_bytes": sz, "run": run}))


if __name__ == "__main__":
    main()
