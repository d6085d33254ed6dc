#!/usr/bin/env python3
"""PyTorch + Hugging Face transformers peer benchmark for kvlink.

Builds Llama-architecture models with RANDOM weights from a config (no
downloads, no network, no tokenizer) and times the same workloads the kvlink
engine reports, so the two can be put side by side:

  prefill N                       one forward of N random tokens (KV cache on,
                                  logits for the last position only), tok/s
  decode S after C                prefill C tokens, then S greedy steps with the
                                  KV cache in a manual loop, tok/s over the S steps
  decode S after C (generate)     the same through model.generate(); tok/s over
                                  the S-1 forwards that follow the first new token
  generate S after C (incl. prefill)
                                  S / total model.generate() seconds
  ttft full D x L + Q             one prefill of P + D*L + Q tokens (P = prefix,
                                  16 by default), ms until the last logits exist
  ttft reuse D x L + Q            KVLink-style reuse: the prefix and every
                                  document are encoded ALONE beforehand (each at
                                  positions 0..), outside the timing.  Timed:
                                  concatenate the caches along the sequence axis
                                  (torch.cat per layer), re-rotate each
                                  document's keys by its start offset, build a
                                  DynamicCache from that, then forward the Q
                                  question tokens after it; ms until the last
                                  logits exist.
  peak memory                     torch.cuda.max_memory_allocated per shape (cuda)

Every result is one JSON line on stdout:
  {"engine": "pytorch", "shape": ..., "measure": ..., "value": ..., "unit": ...,
   "device": ..., "torch": ..., "transformers": ...}
and a markdown table (with per-measure peak memory on cuda) goes to stderr at
the end.  Timed values are the median over --repeats runs after --warmup runs.

Usage:
  python3 scripts/peers/hf_bench.py --shape llama-3.2-1b,smollm2-135m > pytorch.jsonl
  python3 scripts/peers/hf_bench.py --shape smollm2-135m --measures ttft --docs 10
  python3 scripts/peers/hf_bench.py --self-check        # RoPE re-rotation check, CPU ok
  python3 scripts/peers/hf_bench.py --shape tiny --device cpu --dtype fp32 \\
      --docs 3 --doc-len 16 --question-len 4 --repeats 1 --warmup 0

Re-rotation: a key cached at position p is k_p = R(p) k.  Moving it to p+delta
only needs R(delta) k_p = k_p*cos(delta*inv_freq) + rotate_half(k_p)*sin(delta*inv_freq)
(the rotate_half layout the HF Llama uses).  The script concatenates first and
then rotates all keys of a layer at once with a per-token delta table (the
prefix gets delta 0), which is the same arithmetic as rotating each document
separately, in fewer kernels.  `--self-check` verifies on a tiny fp32 model that
the re-rotated keys equal the keys of the document encoded directly at
delta..delta+L-1, that the reuse cache gives the same question logits as a cache
built from documents encoded at their true offsets, and that a single document
reused at offset 0 gives the same logits as a full prefill.  It exits non-zero
on failure.

Works with transformers 4.4x and 5.x: the cache keyword (`cache` in newer 5.x,
`past_key_values` before), `logits_to_keep` / `num_logits_to_keep` and the
DynamicCache internals are detected at run time.  A measure that cannot run is
skipped with a line on stderr.
"""

import argparse
import gc
import inspect
import json
import math
import statistics
import sys
import time

try:
    import torch
except ImportError:
    sys.exit("hf_bench: PyTorch is not installed (pip install torch)")
try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("hf_bench: transformers is not installed (pip install transformers)")
try:
    from transformers import DynamicCache
except ImportError:  # very old transformers
    DynamicCache = None

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=8192,
        vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=16384,
    ),
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536,
        vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=16384,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=16384,
    ),
}
DEFAULT_SHAPES = ["llama-3.2-1b", "smollm2-135m"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALL_MEASURES = ["prefill", "decode", "generate", "ttft"]


def log(msg):
    print(f"hf_bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model / API


def build_config(shape):
    kw = dict(SHAPES[shape])
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True)
    try:
        cfg = LlamaConfig(attn_implementation="sdpa", **kw)
    except TypeError:
        cfg = LlamaConfig(**kw)
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    return cfg


def build_model(shape, device, dtype):
    cfg = build_config(shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Parameters are created directly on the device in the target dtype;
        # no model.to(dtype) afterwards, so the fp32 RoPE inv_freq buffer stays fp32
        # as it does after from_pretrained(dtype=...).
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    bad = {p.dtype for p in model.parameters()} - {dtype}
    if bad:
        model.to(dtype=dtype)
    # Sanity: RoPE theta must have arrived in the model (4.x: rope_theta, 5.x: rope_parameters).
    theta = SHAPES[shape]["rope_theta"]
    hd = SHAPES[shape]["head_dim"]
    want = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    got = rotary_inv_freq(model).cpu()
    if got.shape != want.shape or (got - want).abs().max().item() > 1e-3 * want.abs().max().item():
        log(f"WARNING: {shape}: model inv_freq does not match rope_theta={theta}")
    return model


def rotary_inv_freq(model):
    rot = getattr(model.model, "rotary_emb", None)
    if rot is None:  # older layouts keep one per attention layer
        rot = model.model.layers[0].self_attn.rotary_emb
    return rot.inv_freq.detach().float()


class Api:
    """What the installed transformers accepts."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" in params:
            self.logits_kw = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self.logits_kw = "num_logits_to_keep"
        else:
            self.logits_kw = None
        self.config = model.config

    def describe(self):
        return f"cache kwarg={self.cache_kw}, last-logits kwarg={self.logits_kw or 'none (all logits computed)'}"

    def new_cache(self):
        if DynamicCache is None:
            return None
        try:
            return DynamicCache(config=self.config)
        except TypeError:
            return DynamicCache()

    def forward(self, model, input_ids, cache=None, position_ids=None, last_only=True):
        kw = {"input_ids": input_ids, "use_cache": True}
        if cache is not None:
            kw[self.cache_kw] = cache
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if last_only and self.logits_kw:
            kw[self.logits_kw] = 1
        return model(**kw)

    @staticmethod
    def out_cache(out):
        keys = out.keys()
        for name in ("cache", "past_key_values"):
            if name in keys:
                return out[name]
        return None


def cache_kv(cache):
    """[(k, v)] per layer, each [batch, kv_heads, seq, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "keys"):
        return [(l.keys, l.values) for l in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if hasattr(cache, "to_legacy_cache"):
        return [(t[0], t[1]) for t in cache.to_legacy_cache()]
    if isinstance(cache, (tuple, list)):
        return [(t[0], t[1]) for t in cache]
    raise RuntimeError(f"cannot read keys/values out of {type(cache).__name__}")


def cache_from_kv(api, kvs):
    cache = api.new_cache()
    if cache is None:
        raise RuntimeError("transformers has no DynamicCache")
    for i, (k, v) in enumerate(kvs):
        cache.update(k, v, i)
    return cache


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def delta_table(deltas, inv_freq, dtype):
    """cos/sin [seq, head_dim] for per-token position deltas (1-D int tensor)."""
    ang = deltas.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rerotate(k, cos, sin):
    """Keys [b, h, s, d] already rotated at p -> rotated at p + delta (cos/sin [s, d])."""
    return k * cos + rotate_half(k) * sin


def encode_alone(model, api, ids, start=0):
    """KV of `ids` encoded with nothing before it, at positions start.. (no logits needed)."""
    cache = api.new_cache()
    pos = None
    if start:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None, :]
    out = api.forward(model, ids, cache=cache, position_ids=pos, last_only=True)
    c = api.out_cache(out)
    return [(k.clone(), v.clone()) for k, v in cache_kv(c if c is not None else cache)]


def build_reuse_cache(api, segments, inv_freq, deltas):
    """segments: list of per-segment [(k, v)] (each encoded at 0..); deltas: 1-D int
    tensor with the start position of every token's segment (0 for the prefix)."""
    dtype = segments[0][0][0].dtype
    cos, sin = delta_table(deltas, inv_freq, dtype)
    kvs = []
    for layer in range(len(segments[0])):
        k = torch.cat([seg[layer][0] for seg in segments], dim=-2)
        v = torch.cat([seg[layer][1] for seg in segments], dim=-2)
        kvs.append((rerotate(k, cos, sin), v))
    return cache_from_kv(api, kvs)


def segment_deltas(seg_lens, starts, device):
    parts = [torch.full((n,), s, dtype=torch.int64) for n, s in zip(seg_lens, starts)]
    return torch.cat(parts).to(device)


# -------------------------------------------------------------------- timing


class Bench:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.device_name = torch.cuda.get_device_name(device)
        else:
            self.device_name = "cpu"
        self.rows = []  # (shape, measure, value, unit, peak_mib)
        self.skipped = []
        self.gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ids(self, n, vocab):
        # tokens 3.. to stay clear of bos/eos/pad
        return torch.randint(3, vocab, (1, n), generator=self.gen).to(self.device)

    def timed(self, fn):
        """fn() -> seconds (it syncs and times itself). Median over repeats."""
        for _ in range(self.args.warmup):
            fn()
        return statistics.median(fn() for _ in range(self.args.repeats))

    def clock(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def emit(self, shape, measure, value, unit, peak=None):
        rec = {
            "engine": "pytorch", "shape": shape, "measure": measure,
            "value": round(value, 4), "unit": unit, "device": self.device_name,
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        print(json.dumps(rec), flush=True)
        self.rows.append((shape, measure, value, unit, peak))

    def run_measure(self, shape, measure, fn, unit):
        """fn() -> value. Exceptions skip the measure."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.inference_mode():
                value = fn()
        except Exception as e:  # includes torch.cuda.OutOfMemoryError
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"SKIP {shape} / {measure}: {msg}")
            self.skipped.append((shape, measure, msg))
            if self.cuda:
                torch.cuda.empty_cache()
            return
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None
        self.emit(shape, measure, value, unit, peak)
        self.shape_peak = max(self.shape_peak, peak or 0)

    # ------------------------------------------------------------ measures

    def bench_shape(self, shape):
        a = self.args
        self.shape_peak = 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        model = build_model(shape, self.device, DTYPES[a.dtype])
        api = Api(model)
        nparams = sum(p.numel() for p in model.parameters())
        log(f"{shape}: {nparams / 1e6:.1f}M params, built in {time.perf_counter() - t0:.1f}s, "
            f"attn={getattr(model.config, '_attn_implementation', '?')}, {api.describe()}")
        if self.cuda:
            self.shape_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        vocab = model.config.vocab_size
        m = set(a.measures)

        if "prefill" in m:
            for n in a.prefill_lens:
                ids = self.ids(n, vocab)

                def prefill(ids=ids, n=n):
                    def one():
                        cache = api.new_cache()
                        return self.clock(lambda: api.forward(model, ids, cache=cache))
                    return n / self.timed(one)
                self.run_measure(shape, f"prefill {n}", prefill, "tok/s")

        ctx, steps = a.decode_context, a.decode_steps
        if "decode" in m:
            prompt = self.ids(ctx, vocab)

            def decode():
                def one():
                    cache = api.new_cache()
                    out = api.forward(model, prompt, cache=cache)
                    c = api.out_cache(out)
                    cache = c if c is not None else cache
                    nxt = out.logits[:, -1].argmax(-1)

                    def loop():
                        nonlocal nxt
                        for _ in range(steps):
                            o = api.forward(model, nxt[:, None], cache=cache)
                            nxt = o.logits[:, -1].argmax(-1)
                    return self.clock(loop)
                return steps / self.timed(one)
            self.run_measure(shape, f"decode {steps} after {ctx}", decode, "tok/s")

        if "generate" in m:
            self.bench_generate(shape, model, vocab, ctx, steps)

        if "ttft" in m:
            self.bench_ttft(shape, model, api, vocab)

        if self.cuda:
            self.emit(shape, "peak memory", self.shape_peak, "MiB", self.shape_peak)
        del model
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def bench_generate(self, shape, model, vocab, ctx, steps):
        try:
            from transformers import LogitsProcessor, LogitsProcessorList
        except ImportError as e:
            log(f"SKIP {shape} / generate: {e}")
            return
        bench = self
        prompt = self.ids(ctx, vocab)
        mask = torch.ones_like(prompt)

        class FirstLogits(LogitsProcessor):
            """Timestamps the first call: the prefill's logits exist."""
            t = None

            def __call__(self, input_ids, scores):
                if self.t is None:
                    bench.sync()
                    self.t = time.perf_counter()
                return scores

        totals, decodes = [], []

        def one():
            mark = FirstLogits()
            bench.sync()
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=prompt, attention_mask=mask, max_new_tokens=steps,
                min_new_tokens=steps, do_sample=False, use_cache=True,
                pad_token_id=0, logits_processor=LogitsProcessorList([mark]),
            )
            bench.sync()
            t1 = time.perf_counter()
            new = out.shape[1] - ctx
            if new != steps:
                raise RuntimeError(f"generate produced {new} tokens, wanted {steps}")
            return t1 - t0, t1 - mark.t

        def run_all():
            if totals:
                return
            for _ in range(self.args.warmup):
                one()
            for _ in range(self.args.repeats):
                tot, dec = one()
                totals.append(tot)
                decodes.append(dec)

        def dec_rate():
            run_all()
            return (steps - 1) / statistics.median(decodes)

        def tot_rate():
            run_all()
            return steps / statistics.median(totals)

        self.run_measure(shape, f"decode {steps} after {ctx} (generate)", dec_rate, "tok/s")
        if totals:
            self.run_measure(shape, f"generate {steps} after {ctx} (incl. prefill)", tot_rate, "tok/s")

    def bench_ttft(self, shape, model, api, vocab):
        a = self.args
        D, L, Q, P = a.docs, a.doc_len, a.question_len, a.prefix_len
        total = P + D * L + Q
        if total > model.config.max_position_embeddings:
            log(f"note: {shape}: {total} tokens exceed max_position_embeddings "
                f"{model.config.max_position_embeddings}")
        prefix = self.ids(P, vocab) if P else None
        docs = [self.ids(L, vocab) for _ in range(D)]
        question = self.ids(Q, vocab)
        full = torch.cat(([prefix] if P else []) + docs + [question], dim=1)
        tag = f"{D} x {L} + {Q}"

        def ttft_full():
            def one():
                cache = api.new_cache()

                def fwd():
                    out = api.forward(model, full, cache=cache)
                    out.logits[:, -1]
                return self.clock(fwd)
            return 1000.0 * self.timed(one)
        self.run_measure(shape, f"ttft full {tag}", ttft_full, "ms")

        def ttft_reuse():
            with torch.inference_mode():
                segs = ([encode_alone(model, api, prefix)] if P else []) + \
                    [encode_alone(model, api, d) for d in docs]
            lens = ([P] if P else []) + [L] * D
            starts = ([0] if P else []) + [P + i * L for i in range(D)]
            inv_freq = rotary_inv_freq(model).to(self.device)
            qpos = torch.arange(P + D * L, total, device=self.device)[None, :]
            # per-token start offsets: fixed layout, prepared outside the timing;
            # cos/sin of them and the rotation itself are timed
            deltas = segment_deltas(lens, starts, self.device)
            self.sync()

            def one():
                def fwd():
                    cache = build_reuse_cache(api, segs, inv_freq, deltas)
                    out = api.forward(model, question, cache=cache, position_ids=qpos)
                    out.logits[:, -1]
                return self.clock(fwd)
            return 1000.0 * self.timed(one)
        self.run_measure(shape, f"ttft reuse {tag}", ttft_reuse, "ms")

    def table(self):
        cuda = self.cuda
        lines = ["", f"| shape | measure | value | unit |{' peak MiB |' if cuda else ''}",
                 f"|---|---|---:|---|{'---:|' if cuda else ''}"]
        for shape, measure, value, unit, peak in self.rows:
            v = f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
            p = f" {peak:,.0f} |" if cuda and peak is not None else (" |" if cuda else "")
            lines.append(f"| {shape} | {measure} | {v} | {unit} |{p}")
        lines.append("")
        lines.append(f"device: {self.device_name}, torch {torch.__version__}, "
                     f"transformers {transformers.__version__}, dtype {self.args.dtype}, "
                     f"median of {self.args.repeats} after {self.args.warmup} warmup")
        for shape, measure, msg in self.skipped:
            lines.append(f"skipped: {shape} / {measure}: {msg}")
        print("\n".join(lines), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- self-check


def self_check(seed):
    """RoPE re-rotation + reuse-cache checks on the tiny shape, fp32 CPU."""
    torch.manual_seed(seed)
    dev = torch.device("cpu")
    model = build_model("tiny", dev, torch.float32)
    api = Api(model)
    log(f"self-check: transformers {transformers.__version__}, {api.describe()}")
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    inv_freq = rotary_inv_freq(model)
    L, delta, tol = 16, 37, 1e-4
    failures = []

    def report(name, diff):
        ok = diff < tol
        log(f"self-check {'ok  ' if ok else 'FAIL'} {name}: max abs diff {diff:.3e} (tol {tol:g})")
        if not ok:
            failures.append(name)

    with torch.inference_mode():
        doc = torch.randint(3, V, (1, L), generator=g)
        # 1. re-rotated keys of a document encoded at 0.. == keys of it encoded at delta..
        at0 = encode_alone(model, api, doc, 0)
        atd = encode_alone(model, api, doc, delta)
        cos, sin = delta_table(torch.full((L,), delta), inv_freq, torch.float32)
        kdiff = max((rerotate(k0, cos, sin) - k1).abs().max().item() for (k0, _), (k1, _) in zip(at0, atd))
        vdiff = max((v0 - v1).abs().max().item() for (_, v0), (_, v1) in zip(at0, atd))
        rot0 = max((k0 - k1).abs().max().item() for (k0, _), (k1, _) in zip(at0, atd))
        report(f"keys re-rotated by {delta} vs encoded at {delta}..{delta + L - 1}", kdiff)
        report("values independent of position", vdiff)
        if rot0 < 1e-3:
            failures.append("positions had no effect on keys (test is vacuous)")
            log("self-check FAIL: keys at 0 and at delta are identical; RoPE not applied?")

        # 2. full reuse pipeline vs a cache of documents encoded at their true offsets.
        P, D, Q = 5, 3, 4
        prefix = torch.randint(3, V, (1, P), generator=g)
        docs = [torch.randint(3, V, (1, L), generator=g) for _ in range(D)]
        q = torch.randint(3, V, (1, Q), generator=g)
        starts = [0] + [P + i * L for i in range(D)]
        lens = [P] + [L] * D
        segs = [encode_alone(model, api, prefix)] + [encode_alone(model, api, d) for d in docs]
        qpos = torch.arange(P + D * L, P + D * L + Q)[None, :]
        reuse = build_reuse_cache(api, segs, inv_freq, segment_deltas(lens, starts, dev))
        if reuse.get_seq_length() != P + D * L:
            failures.append("reuse cache length")
            log(f"self-check FAIL: reuse cache length {reuse.get_seq_length()} != {P + D * L}")
        out_r = api.forward(model, q, cache=reuse, position_ids=qpos, last_only=False).logits
        true = [encode_alone(model, api, prefix)] + \
            [encode_alone(model, api, d, s) for d, s in zip(docs, starts[1:])]
        ref = cache_from_kv(api, [(torch.cat([t[i][0] for t in true], -2),
                                   torch.cat([t[i][1] for t in true], -2))
                                  for i in range(len(true[0]))])
        out_t = api.forward(model, q, cache=ref, position_ids=qpos, last_only=False).logits
        report("question logits: reuse cache vs docs encoded at true offsets", (out_r - out_t).abs().max().item())

        # 3. one document, no prefix: reuse == full prefill of doc + question.
        one = build_reuse_cache(api, [encode_alone(model, api, docs[0])], inv_freq,
                                segment_deltas([L], [0], dev))
        out_1 = api.forward(model, q, cache=one, position_ids=torch.arange(L, L + Q)[None, :],
                            last_only=False).logits
        full = api.forward(model, torch.cat([docs[0], q], 1), cache=api.new_cache(), last_only=False).logits
        report("single doc reuse vs full prefill (question logits)", (out_1 - full[:, -Q:]).abs().max().item())

        # 4. last-only logits match the full-logits last row.
        last = api.forward(model, q, cache=api.new_cache(), last_only=True).logits
        allq = api.forward(model, q, cache=api.new_cache(), last_only=False).logits
        report("last-position logits (logits_to_keep)", (last[:, -1] - allq[:, -1]).abs().max().item())

    if failures:
        log(f"self-check FAILED: {len(failures)} check(s)")
        return 1
    log("self-check passed")
    return 0


# ---------------------------------------------------------------------- main


def comma_list(values, allowed=None, conv=str):
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            if allowed is not None and part not in allowed:
                raise SystemExit(f"hf_bench: unknown value {part!r}; choose from {', '.join(allowed)}")
            out.append(conv(part))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="hf_bench.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", metavar="NAME[,NAME]",
                   help=f"model shape(s), repeatable or comma list: {', '.join(SHAPES)} "
                        f"(default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="weights/activation dtype (default: bf16; fp32 is the sensible choice on cpu)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measure, median reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones (default: 2)")
    p.add_argument("--measures", action="append", metavar="M[,M]",
                   help=f"subset of {','.join(ALL_MEASURES)} (default: all)")
    p.add_argument("--prefill-lens", action="append", metavar="N[,N]",
                   help="prefill lengths (default: 512,2048)")
    p.add_argument("--decode-context", type=int, default=512,
                   help="prompt tokens before decoding (default: 512)")
    p.add_argument("--decode-steps", type=int, default=128, help="greedy decode steps (default: 128)")
    p.add_argument("--docs", type=int, default=20, help="TTFT: number of documents D (default: 20)")
    p.add_argument("--doc-len", type=int, default=512, help="TTFT: tokens per document L (default: 512)")
    p.add_argument("--question-len", type=int, default=32, help="TTFT: question tokens Q (default: 32)")
    p.add_argument("--prefix-len", type=int, default=16,
                   help="TTFT: shared prefix tokens P before the documents, cached alone in "
                        "the reuse path (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and token ids (default: 0)")
    p.add_argument("--self-check", action="store_true",
                   help="only verify RoPE re-rotation and the reuse cache on the tiny shape "
                        "(fp32, cpu); exit status 1 on failure")
    a = p.parse_args(argv)

    try:
        transformers.logging.set_verbosity_error()
    except Exception:
        pass

    if a.self_check:
        return self_check(a.seed)

    a.shapes = comma_list(a.shape or DEFAULT_SHAPES, allowed=list(SHAPES))
    a.measures = comma_list(a.measures or ALL_MEASURES, allowed=ALL_MEASURES)
    a.prefill_lens = comma_list(a.prefill_lens or ["512,2048"], conv=int)
    if a.repeats < 1 or a.warmup < 0:
        raise SystemExit("hf_bench: --repeats must be >= 1 and --warmup >= 0")
    if a.docs < 1 or a.doc_len < 1 or a.question_len < 1 or a.prefix_len < 0 or a.decode_steps < 1:
        raise SystemExit("hf_bench: --docs/--doc-len/--question-len/--decode-steps must be >= 1")

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("hf_bench: --device cuda but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif a.dtype != "fp32":
        log(f"note: {a.dtype} on {device.type} works but is slow; --dtype fp32 is usual there")
    torch.manual_seed(a.seed)

    bench = Bench(a, device)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {bench.device_name}")
    for shape in a.shapes:
        try:
            bench.bench_shape(shape)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            log(f"SKIP {shape} (all measures): {msg}")
            bench.skipped.append((shape, "*", msg))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bench.table()
    return 0 if bench.rows else 2


if __name__ == "__main__":
    sys.exit(main())
