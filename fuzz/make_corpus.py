#!/usr/bin/env python3
"""Write the seed corpus under fuzz/corpus/<target>/: small, valid (or nearly valid)
inputs for each target, made from scratch (no model download). Deterministic: rerun
it and the files come out byte for byte the same. Usage: python3 fuzz/make_corpus.py"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = b"\n#kvlink-fuzz-next-file#\n"  # as kvlink::fuzz::SEP (src/fuzz.rs)


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    assert len(data) < 100_000, (target, name, len(data))
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def lcg_bytes(n, seed=12345):
    x, b = seed, bytearray()
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        b.append((x >> 16) & 0xFF)
    return bytes(b)


# ---------------------------------------------------------------------------- GGUF

def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


class Gguf:
    # (type id, struct format) of scalar metadata values
    U32, F32, BOOL, STR, ARR, I32 = 4, 6, 7, 8, 9, 5

    def __init__(self):
        self.kv, self.infos, self.data = [], [], bytearray()

    def u32(self, k, v):
        self.kv.append(gstr(k) + struct.pack("<II", 4, v))

    def f32(self, k, v):
        self.kv.append(gstr(k) + struct.pack("<If", 6, v))

    def boolean(self, k, v):
        self.kv.append(gstr(k) + struct.pack("<IB", 7, int(v)))

    def str(self, k, v):
        self.kv.append(gstr(k) + struct.pack("<I", 8) + gstr(v))

    def str_arr(self, k, vs):
        self.kv.append(gstr(k) + struct.pack("<IIQ", 9, 8, len(vs)) + b"".join(gstr(v) for v in vs))

    def f32_arr(self, k, vs):
        self.kv.append(gstr(k) + struct.pack("<IIQ", 9, 6, len(vs)) + struct.pack(f"<{len(vs)}f", *vs))

    def i32_arr(self, k, vs):
        self.kv.append(gstr(k) + struct.pack("<IIQ", 9, 5, len(vs)) + struct.pack(f"<{len(vs)}i", *vs))

    def tensor(self, name, dims, ggml_type, raw):
        while len(self.data) % 32:
            self.data.append(0)
        off = len(self.data)
        self.data += raw
        self.infos.append(gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                          + struct.pack("<IQ", ggml_type, off))

    def bytes(self):
        b = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(self.infos), len(self.kv)))
        for x in self.kv + self.infos:
            b += x
        while len(b) % 32:
            b.append(0)
        return bytes(b + self.data)


def tiny_llama(g, layers=1):
    g.str("general.architecture", "llama")
    g.u32("llama.embedding_length", 8)
    g.u32("llama.block_count", layers)
    g.u32("llama.feed_forward_length", 32)
    g.u32("llama.attention.head_count", 2)
    g.u32("llama.attention.head_count_kv", 1)
    g.f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    g.u32("llama.context_length", 64)


def f32s(n, scale=0.01):
    return struct.pack(f"<{n}f", *[((i * 37) % 23 - 11) * scale for i in range(n)])


F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 8, 12, 14

# A whole tiny model: every tensor of one layer, in several ggml types.
g = Gguf()
tiny_llama(g)
g.str("tokenizer.ggml.model", "gpt2")
g.str_arr("tokenizer.ggml.tokens", [chr(ord("a") + i) for i in range(10)])
g.tensor("token_embd.weight", [8, 10], F32, f32s(80))
g.tensor("output_norm.weight", [8], F32, f32s(8))
g.tensor("blk.0.attn_norm.weight", [8], F32, f32s(8))
g.tensor("blk.0.ffn_norm.weight", [8], F32, f32s(8))
g.tensor("blk.0.attn_q.weight", [8, 8], F16, struct.pack("<64e", *[i / 64 for i in range(64)]))
g.tensor("blk.0.attn_k.weight", [8, 4], F32, f32s(32))
g.tensor("blk.0.attn_v.weight", [8, 4], F32, f32s(32))
g.tensor("blk.0.attn_output.weight", [8, 8], F32, f32s(64))
# Quantized blocks need a first dimension that is a multiple of the block size.
g.tensor("blk.0.ffn_gate.weight", [32, 8], Q4_0, lcg_bytes(18 * 8, 1))
g.tensor("blk.0.ffn_up.weight", [32, 8], Q8_0, lcg_bytes(34 * 8, 2))
g.tensor("blk.0.ffn_down.weight", [32, 8], Q4_1, lcg_bytes(20 * 8, 3))
out("gguf", "tiny_llama.gguf", g.bytes())

# K-quants and Qwen2 biases.
g = Gguf()
g.str("general.architecture", "qwen2")
for k, v in [("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 16),
             ("attention.head_count", 2), ("attention.head_count_kv", 2), ("context_length", 32)]:
    g.u32("qwen2." + k, v)
g.f32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
g.f32("qwen2.rope.freq_base", 1e6)
g.tensor("token_embd.weight", [8, 6], F32, f32s(48))
g.tensor("blk.0.attn_q.bias", [8], F32, f32s(8))
g.tensor("blk.0.ffn_down.weight", [256, 1], Q4_K, lcg_bytes(144, 4))
g.tensor("blk.0.ffn_up.weight", [256, 1], Q6_K, lcg_bytes(210, 5))
out("gguf", "qwen2_kquants.gguf", g.bytes())

# Llama-3 rope scaling metadata.
g = Gguf()
tiny_llama(g)
g.str("llama.rope.scaling.type", "llama3")
g.f32("llama.rope.scaling.factor", 8.0)
g.f32("llama.rope.scaling.low_freq_factor", 1.0)
g.f32("llama.rope.scaling.high_freq_factor", 4.0)
g.u32("llama.rope.scaling.original_context_length", 8192)
g.u32("general.alignment", 64)
g.tensor("token_embd.weight", [8, 10], F32, f32s(80))
out("gguf", "rope_llama3.gguf", g.bytes())
out("gguf", "header_only.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))

# ------------------------------------------------------------------ GGUF tokenizers


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# Byte-level BPE (SmolLM2/Qwen style): the 256-symbol alphabet, a few merges, specials.
alphabet = bytes_to_unicode()
merges = ["Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "H e", "He l", "Hel l", "Hell o", "1 2"]
merged = [m.replace(" ", "") for m in merges]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
tokens = specials + alphabet + merged
types = [3] * len(specials) + [1] * (len(alphabet) + len(merged))
for pre in ["smollm", "qwen2", "llama-bpe"]:
    g = Gguf()
    g.str("tokenizer.ggml.model", "gpt2")
    g.str("tokenizer.ggml.pre", pre)
    g.str_arr("tokenizer.ggml.tokens", tokens)
    g.i32_arr("tokenizer.ggml.token_type", types)
    g.str_arr("tokenizer.ggml.merges", merges)
    g.u32("tokenizer.ggml.bos_token_id", 1)
    g.u32("tokenizer.ggml.eos_token_id", 2)
    g.u32("tokenizer.ggml.padding_token_id", 0)
    g.boolean("tokenizer.ggml.add_bos_token", False)
    g.str("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out("gguf_tokenizer", f"bpe_{pre}.gguf", g.bytes())

# SentencePiece (llama): specials, byte tokens, scored pieces.
sp_tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab", "▁ab", "é"]
sp_types = [2, 3, 3] + [6] * 256 + [1] * 7
sp_scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
g = Gguf()
g.str("tokenizer.ggml.model", "llama")
g.str_arr("tokenizer.ggml.tokens", sp_tokens)
g.i32_arr("tokenizer.ggml.token_type", sp_types)
g.f32_arr("tokenizer.ggml.scores", sp_scores)
g.u32("tokenizer.ggml.bos_token_id", 1)
g.u32("tokenizer.ggml.eos_token_id", 2)
g.u32("tokenizer.ggml.unknown_token_id", 0)
g.boolean("tokenizer.ggml.add_space_prefix", True)
out("gguf_tokenizer", "spm_llama.gguf", g.bytes())

# ---------------------------------------------------------------------- safetensors


def safetensors(tensors, meta=None):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, off, data = {}, 0, b""
    if meta:
        header["__metadata__"] = meta
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f16s(n, scale=0.01):
    return struct.pack(f"<{n}e", *[((i * 37) % 23 - 11) * scale for i in range(n)])


# HF folder: a tiny Llama (vocab 8, hidden 4, 2 heads of 2, 1 kv head, MLP 8, 1 layer).
V, H, Q, KV, FF = 8, 4, 4, 2, 8
hf_cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": H,
          "intermediate_size": FF, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
          "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3]}
L = "model.layers.0."
hf_tensors = [("model.embed_tokens.weight", [V, H]), (L + "input_layernorm.weight", [H]),
              (L + "self_attn.q_proj.weight", [Q, H]), (L + "self_attn.k_proj.weight", [KV, H]),
              (L + "self_attn.v_proj.weight", [KV, H]), (L + "self_attn.o_proj.weight", [H, Q]),
              (L + "post_attention_layernorm.weight", [H]), (L + "mlp.gate_proj.weight", [FF, H]),
              (L + "mlp.up_proj.weight", [FF, H]), (L + "mlp.down_proj.weight", [H, FF]),
              ("model.norm.weight", [H])]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


for dtype, enc, size in [("F16", f16s, 2), ("F32", f32s, 4), ("BF16", None, 2)]:
    ts = []
    for name, shape in hf_tensors:
        n = numel(shape)
        raw = enc(n) if enc else b"".join(struct.pack("<f", v)[2:] for v in [0.015625 * (i % 7) for i in range(n)])
        ts.append((name, dtype, shape, raw))
    st = safetensors(ts, {"format": "pt"})
    out("hf_model", f"tiny_llama_{dtype.lower()}", json.dumps(hf_cfg).encode() + SEP + st)
qwen_cfg = dict(hf_cfg, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False,
                rope_theta=1e6, sliding_window=64, use_sliding_window=False)
ts = [(n, "F16", s, f16s(numel(s))) for n, s in hf_tensors]
ts += [(L + "self_attn.q_proj.bias", "F16", [Q], f16s(Q)), (L + "self_attn.k_proj.bias", "F16", [KV], f16s(KV)),
       (L + "self_attn.v_proj.bias", "F16", [KV], f16s(KV)), ("lm_head.weight", "F16", [V, H], f16s(V * H))]
out("hf_model", "tiny_qwen2_f16", json.dumps(qwen_cfg).encode() + SEP + safetensors(ts))
llama3 = dict(hf_cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
out("hf_model", "config_only_llama3", json.dumps(llama3).encode())

# ------------------------------------------------------------------- disk-store entry
# b"KVLC" | version 1 | header length | header JSON | K, V of each layer (f16) | XXH64.
# The checksum is left zero: the kv_entry target's flag byte 1 computes it.
for n_tokens, n_layers, kv_dim, ids in [(3, 2, 4, [1, 2, 3]), (0, 1, 8, [])]:
    hdr = json.dumps({"format_version": 1, "model_fingerprint": "m", "tokenizer_fingerprint": "t",
                      "n_tokens": n_tokens, "n_layers": n_layers, "kv_dim": kv_dim, "dtype": "f16",
                      "created_unix_ms": 0, "token_ids": ids}).encode()
    payload = f16s(2 * n_layers * n_tokens * kv_dim)
    entry = b"KVLC" + struct.pack("<II", 1, len(hdr)) + hdr + payload + b"\0" * 8
    flag = 1 | (0 if ids else 2)  # fix the checksum; ask for these ids
    out("kv_entry", f"entry_{n_tokens}x{n_layers}x{kv_dim}", bytes([flag]) + entry)
    out("kv_entry", f"entry_{n_tokens}x{n_layers}x{kv_dim}_unchecked", bytes([flag & 2]) + entry)

# -------------------------------------------------------------------- kvlink.json
for name, cfg in [("kvlink_smollm2", {"k": 5, "link_base": 49152, "kv_start": 49352, "kv_end": 49353, "max_slots": 40}),
                  ("plain", {}),
                  ("link_tokens_alias", {"link_tokens": 2, "link_base": 4}),
                  ("adapter_style", {"k": 2, "link_base": 512, "max_slots": 4, "base_vocab": 512, "extra_tokens": 10})]:
    out("link_config", name + ".json", json.dumps(cfg).encode())

# ------------------------------------------------------------------- LoRA adapters
# For kvlink's "tiny" random model: hidden 128, 4 heads x 32 (q 128), 2 kv heads (kv 64),
# MLP 344, 2 layers, vocab 512.
R = 2
peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 4.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_rslora": False,
        "base_model_name_or_path": "tiny"}
P = "base_model.model.model.layers."
lora = [(P + "0.self_attn.q_proj.lora_A.weight", "F16", [R, 128], f16s(R * 128)),
        (P + "0.self_attn.q_proj.lora_B.weight", "F16", [128, R], f16s(128 * R)),
        (P + "1.self_attn.v_proj.lora_A.weight", "F32", [R, 128], f32s(R * 128)),
        (P + "1.self_attn.v_proj.lora_B.weight", "F32", [64, R], f32s(64 * R))]
out("lora_adapter", "q_v_no_link", json.dumps(peft).encode() + SEP + safetensors(lora))
extra = [("kvlink.extra_embeddings", "F16", [10, 128], f16s(10 * 128))]
link = {"k": 2, "link_base": 512, "max_slots": 4, "kv_start": 520, "kv_end": 521, "base_vocab": 512,
        "extra_tokens": 10, "base_model": {"name": "tiny", "hidden_size": 128, "num_hidden_layers": 2, "vocab_size": 512}}
out("lora_adapter", "q_v_extra_rows_link",
    json.dumps(dict(peft, use_rslora=True)).encode() + SEP + safetensors(lora + extra) + SEP + json.dumps(link).encode())
out("lora_adapter", "extra_rows_only", json.dumps(peft).encode() + SEP + safetensors(extra) + SEP + b"{}")
print("corpus written under", os.path.join(HERE, "corpus"))
