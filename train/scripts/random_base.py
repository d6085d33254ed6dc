"""Write a random base model of SmolLM2-135M's shape (or another llama shape) in the
trainer's safetensors base format, for throughput probes on a machine that does not have
the real weights yet:

    python train/scripts/random_base.py OUT.safetensors [--layers 30 --hidden 576 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kvlink_train.model import LlamaConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    a = p.parse_args()
    hd = a.hidden // a.heads
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, head_dim=hd, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, name="random")
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(a.vocab, a.hidden), "model.norm.weight": torch.ones(a.hidden)}
    for i in range(a.layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = torch.ones(a.hidden)
        sd[pre + "post_attention_layernorm.weight"] = torch.ones(a.hidden)
        sd[pre + "self_attn.q_proj.weight"] = r(a.heads * hd, a.hidden)
        sd[pre + "self_attn.k_proj.weight"] = r(a.kv_heads * hd, a.hidden)
        sd[pre + "self_attn.v_proj.weight"] = r(a.kv_heads * hd, a.hidden)
        sd[pre + "self_attn.o_proj.weight"] = r(a.hidden, a.heads * hd)
        sd[pre + "mlp.gate_proj.weight"] = r(a.ffn, a.hidden)
        sd[pre + "mlp.up_proj.weight"] = r(a.ffn, a.hidden)
        sd[pre + "mlp.down_proj.weight"] = r(a.hidden, a.ffn)
    save_file(sd, a.out, metadata={"kvlink_train_config": json.dumps(cfg.to_dict())})


if __name__ == "__main__":
    main()
