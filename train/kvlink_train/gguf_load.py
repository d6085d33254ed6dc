"""Read a llama GGUF into an HF-layout fp32 state dict (Q/K un-permuted to NEOX rotate_half RoPE)."""
from __future__ import annotations

import numpy as np
import torch

from .model import LlamaConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_to_gguf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert permutation (HF rotate_half rows -> interleaved pairs)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_to_hf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `hf_to_gguf_qk`."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: str) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    import gguf  # lazy: the only non-torch dependency, needed only here
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only llama is supported")
    n_head = int(_field(r, "llama.attention.head_count"))
    n_kv = int(_field(r, "llama.attention.head_count_kv", n_head))
    hidden = int(_field(r, "llama.embedding_length"))
    tensors = {t.name: t for t in r.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists [in, out]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.asarray(t.data, dtype=np.float32)
        else:
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        return np.array(a.reshape(shape), dtype=np.float32, order="C")  # owned, writable copy

    embd = get("token_embd.weight")
    head_dim = int(_field(r, "llama.attention.key_length", hidden // n_head))
    vocab = int(embd.shape[0])
    n_layer = int(_field(r, "llama.block_count"))
    freq_factors = None
    if "rope_freqs.weight" in tensors:  # Llama-3 rope scaling baked in by llama.cpp
        freq_factors = [float(x) for x in get("rope_freqs.weight").reshape(-1)]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(r, "llama.feed_forward_length")),
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        name=str(_field(r, "general.name", "") or ""),
        rope_freq_factors=freq_factors,
    )
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": embd, "model.norm.weight": get("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(n_layer):
        for g, h in _LAYER_NAMES.items():
            w = get(f"blk.{i}.{g}.weight")
            if g == "attn_q":
                w = gguf_to_hf_qk(w, n_head)
            elif g == "attn_k":
                w = gguf_to_hf_qk(w, n_kv)
            sd[f"model.layers.{i}.{h}.weight"] = w
    return cfg, {k: torch.from_numpy(v) for k, v in sd.items()}
