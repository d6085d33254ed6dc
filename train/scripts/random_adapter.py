"""Write an adapter with random non-zero LoRA B (and random extra rows) for a base model, to
check an engine's adapter loading against `kvlink_train.logits` without training:

    python train/scripts/random_adapter.py MODEL.gguf OUTDIR [--k 5 --slots 40 --scale 0.02]
    kvlink logits -m MODEL.gguf --lora OUTDIR ... --json > e.json
    python -m kvlink_train.logits --model MODEL.gguf --adapter OUTDIR --engine-json e.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvlink_train.base import load_base  # noqa: E402
from kvlink_train.export import export_adapter  # noqa: E402
from kvlink_train.model import KVLinkLlama  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--slots", type=int, default=40)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--scale", type=float, default=0.02, help="std of the random B entries")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg, base = load_base(a.model)
    V = cfg.vocab_size
    kv = {"k": a.k, "link_base": V, "kv_start": V + a.k * a.slots, "kv_end": V + a.k * a.slots + 1,
          "max_slots": a.slots}
    n_extra = a.k * a.slots + 2
    torch.manual_seed(a.seed)
    m = KVLinkLlama(cfg, n_extra, a.r, a.alpha)
    m.load_base(base)
    m.init_extra(torch.Generator().manual_seed(a.seed + 1))
    g = torch.Generator().manual_seed(a.seed + 2)
    with torch.no_grad():
        for n, t in m.named_parameters():
            if n.endswith("lora_B"):
                t.copy_(torch.randn(t.shape, generator=g) * a.scale)
    meta = {"config": cfg.to_dict(), "kvlink_json": json.dumps(kv), "base_vocab": V, "n_extra": n_extra,
            "lora_r": a.r, "lora_alpha": a.alpha, "lora_dropout": 0.0}
    print(export_adapter(m.trainable_state(), meta, a.out))


if __name__ == "__main__":
    main()
