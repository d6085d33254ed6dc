"""Tiny random llama GGUF and synthetic samples files for the tests."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvlink_train.data import write_samples  # noqa: E402
from kvlink_train.gguf_load import hf_to_gguf_qk  # noqa: E402

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=300, theta=10000.0, eps=1e-5)
K, LINK_BASE, MAX_SLOTS, KV_START, KV_END = 2, 300, 4, 308, 309
KVLINK_JSON = json.dumps({"k": K, "link_base": LINK_BASE, "kv_start": KV_START, "kv_end": KV_END,
                          "max_slots": MAX_SLOTS, "template": "test"})
COMPONENTS = ["qa_mem", "qa"]


def tiny_hf_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = TINY
    H, I, hd = c["hidden"], c["ffn"], c["hidden"] // c["heads"]
    w = lambda *s: (rng.standard_normal(s) * 0.08).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": w(c["vocab"], H),
          "model.norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        sd[p + "self_attn.q_proj.weight"] = w(c["heads"] * hd, H)
        sd[p + "self_attn.k_proj.weight"] = w(c["kv_heads"] * hd, H)
        sd[p + "self_attn.v_proj.weight"] = w(c["kv_heads"] * hd, H)
        sd[p + "self_attn.o_proj.weight"] = w(H, c["heads"] * hd)
        sd[p + "mlp.gate_proj.weight"] = w(I, H)
        sd[p + "mlp.up_proj.weight"] = w(I, H)
        sd[p + "mlp.down_proj.weight"] = w(H, I)
    return sd


def write_tiny_gguf(path: str, sd: dict[str, np.ndarray], output: np.ndarray | None = None,
                    rope_freqs: np.ndarray | None = None) -> None:
    import gguf

    c = TINY
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_name("tiny-test")
    wr.add_block_count(c["layers"])
    wr.add_context_length(512)
    wr.add_embedding_length(c["hidden"])
    wr.add_feed_forward_length(c["ffn"])
    wr.add_head_count(c["heads"])
    wr.add_head_count_kv(c["kv_heads"])
    wr.add_rope_freq_base(c["theta"])
    wr.add_layer_norm_rms_eps(c["eps"])
    wr.add_vocab_size(c["vocab"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    wr.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    wr.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if output is not None:
        wr.add_tensor("output.weight", output)
    if rope_freqs is not None:
        wr.add_tensor("rope_freqs.weight", rope_freqs)
    for i in range(c["layers"]):
        for h, g in names.items():
            a = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                a = hf_to_gguf_qk(a, c["heads"])
            elif g == "attn_k":
                a = hf_to_gguf_qk(a, c["kv_heads"])
            wr.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(a))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def kvlink_sample(rng: np.random.Generator, n_docs: int, plain: bool = False) -> dict:
    """prefix, S, (doc_j seg j+1, links seg 0)*, E, question, answer (loss 1); plain = no markers/links, seg 0."""
    toks: list[int] = []
    segs: list[int] = []
    loss: list[int] = []

    def put(ids, seg, lab=0):
        toks.extend(int(x) for x in ids)
        segs.extend([seg] * len(ids))
        loss.extend([lab] * len(ids))

    put(rng.integers(1, 300, rng.integers(2, 5)), 0)
    if not plain:
        put([KV_START], 0)
    for j in range(n_docs):
        put(rng.integers(1, 300, rng.integers(3, 9)), 0 if plain else j + 1)
        if not plain:
            put([LINK_BASE + K * j + i for i in range(K)], 0)
    if not plain:
        put([KV_END], 0)
    put(rng.integers(1, 300, rng.integers(2, 5)), 0)
    put(rng.integers(1, 300, rng.integers(2, 6)), 0, 1)
    return {"tokens": toks, "segments": segs, "positions": list(range(len(toks))), "loss": loss,
            "component": 1 if plain else 0}


RECIPE = '{"args": ["train-data", "--seed", "0"]}'


def make_samples(path: str, n: int = 12, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    ss = [kvlink_sample(rng, int(rng.integers(1, MAX_SLOTS + 1)), plain=(i % 3 == 2)) for i in range(n)]
    write_samples(path, ss, COMPONENTS, TINY["vocab"], KVLINK_JSON, RECIPE)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    sd = tiny_hf_state()
    gg = str(d / "tiny.gguf")
    write_tiny_gguf(gg, sd)
    samples = make_samples(str(d / "samples.safetensors"))
    return {"gguf": gg, "hf": sd, "samples": samples, "dir": d}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)
