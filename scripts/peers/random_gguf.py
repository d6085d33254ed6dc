#!/usr/bin/env python3
"""Write a random-weight F16 GGUF (llama architecture) for benchmarking.

    python3 scripts/peers/random_gguf.py --shape llama-3.2-1b --out /tmp/x.gguf

Needs only numpy and the `gguf` package. Weights ~ N(0, 0.02) stored as F16,
norm weights = 1 stored as F32. The output projection is tied to token_embd
(no output.weight), as in Llama-3.2-1B and SmolLM2-135M. No tokenizer: the file
sets tokenizer.ggml.model = "none" plus llama.vocab_size, which llama.cpp
loads as LLAMA_VOCAB_TYPE_NONE with that many dummy tokens (enough for
llama-bench, which feeds random token ids). No rope-scaling tensor
(rope_freqs.weight) is written; it does not change the amount of work.

Tensors are streamed: the header and tensor index are written first, then
each tensor is generated and written in turn, so memory stays at about one
tensor (token_embd of the 1B shape: 128256 x 2048 f16 = 525 MB).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np

SHAPES = {
    # hidden, layers, heads, kv heads, ff, vocab, rope theta, context, rms eps
    "llama-3.2-1b": dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
                         n_vocab=128256, rope_theta=500000.0, n_ctx=131072, eps=1e-5),
    "smollm2-135m": dict(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536,
                         n_vocab=49152, rope_theta=100000.0, n_ctx=8192, eps=1e-5),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                 n_vocab=256, rope_theta=10000.0, n_ctx=2048, eps=1e-5),
}


def import_gguf():
    # gguf/metadata.py imports yaml at module level but we never use it; stub
    # it where PyYAML is not installed (e.g. the GPU machine).
    try:
        import yaml  # noqa: F401
    except ImportError:
        sys.modules["yaml"] = types.ModuleType("yaml")
    import gguf
    return gguf


def tensor_list(s):
    """(name, numpy shape (rows, cols) i.e. GGUF ne reversed, dtype, kind)."""
    e, hd = s["n_embd"], s["n_embd"] // s["n_head"]
    q, kv, ff = s["n_head"] * hd, s["n_head_kv"] * hd, s["n_ff"]
    out = [("token_embd.weight", (s["n_vocab"], e), np.float16, "w")]
    for i in range(s["n_layer"]):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (e,), np.float32, "one"),
            (b + "attn_q.weight", (q, e), np.float16, "w"),
            (b + "attn_k.weight", (kv, e), np.float16, "w"),
            (b + "attn_v.weight", (kv, e), np.float16, "w"),
            (b + "attn_output.weight", (e, q), np.float16, "w"),
            (b + "ffn_norm.weight", (e,), np.float32, "one"),
            (b + "ffn_gate.weight", (ff, e), np.float16, "w"),
            (b + "ffn_up.weight", (ff, e), np.float16, "w"),
            (b + "ffn_down.weight", (e, ff), np.float16, "w"),
        ]
    out.append(("output_norm.weight", (e,), np.float32, "one"))
    return out


def make(shape, dtype, kind, rng, std):
    if kind == "one":
        return np.ones(shape, dtype=dtype)
    n = int(np.prod(shape))
    a = np.empty(n, dtype=np.float16)
    chunk = 1 << 24
    for off in range(0, n, chunk):
        m = min(chunk, n - off)
        x = rng.standard_normal(m, dtype=np.float32)
        x *= std
        a[off:off + m] = x
    return a.reshape(shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", help="output path (default /tmp/kvlink-gguf/<shape>-f16.gguf)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args()

    s = SHAPES[args.shape]
    out = args.out or f"/tmp/kvlink-gguf/{args.shape}-f16.gguf"
    if os.path.exists(out) and not args.force:
        print(f"{out} exists; skipping (--force to rewrite)", file=sys.stderr)
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    gguf = import_gguf()

    t0 = time.time()
    tmp = out + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    hd = s["n_embd"] // s["n_head"]
    w.add_name(f"random {args.shape}")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_vocab_size(s["n_vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("none")

    tensors = tensor_list(s)
    for name, shp, dt, _ in tensors:
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    rng = np.random.default_rng(args.seed)
    n_params = 0
    for name, shp, dt, kind in tensors:
        a = make(shp, dt, kind, rng, args.std)
        n_params += a.size
        w.write_tensor_data(a)
    w.close()
    os.replace(tmp, out)
    print(f"wrote {out}: {args.shape}, {n_params / 1e6:.1f}M params, "
          f"{os.path.getsize(out) / 1e6:.1f} MB in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
