"""Top-k next-token logprobs of the last row, fp32, with an exported adapter merged from disk.

python -m kvlink_train.logits --model M.gguf [--adapter DIR] --tokens 1,2,3 [--segments 0,0,1] [--top 10]
python -m kvlink_train.logits --model M.gguf [--adapter DIR] --engine-json out.json   # `kvlink logits --json`
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from .base import load_base
from .export import merge_adapter
from .model import KVLinkLlama


def load_merged(model_path: str, adapter: Optional[str] = None) -> KVLinkLlama:
    """fp32 model with the adapter merged (W + alpha/r * B@A) and its extra rows, no LoRA modules."""
    cfg, base = load_base(model_path)
    extra = None
    if adapter:
        base, extra, _ = merge_adapter(base, adapter)
    m = KVLinkLlama(cfg, 0 if extra is None else extra.shape[0], lora_r=0)
    m.load_base(base)
    if extra is not None:
        with torch.no_grad():
            m.model.extra_embeddings.copy_(extra)
    return m.eval()


def last_logprobs(m: KVLinkLlama, tokens: list[int], segments: list[int], positions: list[int]) -> torch.Tensor:
    t = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
    with torch.no_grad():
        h = m.hidden(t(tokens), t(segments), t(positions))
        return torch.log_softmax(m.lm_logits(h[0, -1]), -1)


def _ints(s: Optional[str]) -> Optional[list[int]]:
    return None if s is None else [int(x) for x in s.replace(" ", "").split(",") if x]


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m kvlink_train.logits", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="exported adapter folder")
    p.add_argument("--tokens", default=None, help="comma-separated ids")
    p.add_argument("--segments", default=None, help="comma-separated segment ids (default all 0)")
    p.add_argument("--positions", default=None, help="comma-separated positions (default 0..n-1)")
    p.add_argument("--engine-json", default=None,
                   help="output of `kvlink logits --json`: use its tokens/segments/positions and compare its top")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args(argv)
    eng = None
    if a.engine_json:
        with open(a.engine_json) as f:
            eng = json.load(f)
        tokens, segments, positions = eng["tokens"], eng.get("segments"), eng.get("positions")
    else:
        if a.tokens is None:
            p.error("--tokens or --engine-json is required")
        tokens, segments, positions = _ints(a.tokens), _ints(a.segments), _ints(a.positions)
    n = len(tokens)
    segments = segments or [0] * n
    positions = positions or list(range(n))
    if not (len(segments) == len(positions) == n):
        p.error("tokens, segments and positions differ in length")
    m = load_merged(a.model, a.adapter)
    lp = last_logprobs(m, tokens, segments, positions)
    v, i = lp.topk(a.top)
    top = [{"id": int(j), "logprob": float(x)} for x, j in zip(v, i)]
    out: dict = {"tokens": tokens, "segments": segments, "positions": positions, "logits_last": top}
    if eng is not None:
        et = eng.get("top", [])
        diffs = [abs(float(e["logprob"]) - float(lp[int(e["id"])])) for e in et]
        out["engine_top"] = [{"id": e["id"], "logprob": e["logprob"]} for e in et]
        out["max_abs_logprob_diff"] = max(diffs) if diffs else None
        out["top1_agree"] = bool(et) and int(et[0]["id"]) == top[0]["id"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
