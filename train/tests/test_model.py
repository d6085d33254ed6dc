from __future__ import annotations

import numpy as np
import torch

from conftest import KV_END, KV_START, LINK_BASE, TINY
from kvlink_train.base import load_base
from kvlink_train.gguf_load import gguf_to_hf_qk, hf_to_gguf_qk
from kvlink_train.model import KVLinkLlama, kvlink_mask


def loop_mask(seg: list[int]) -> np.ndarray:
    L = len(seg)
    m = np.zeros((L, L), bool)
    for t in range(L):
        for s in range(L):
            if seg[t] < 0:
                m[t, s] = s == t
            elif seg[s] >= 0 and s <= t and (seg[t] == seg[s] or seg[t] == 0):
                m[t, s] = True
    return m


def tiny_model(tiny, n_extra: int = 10, lora: bool = True, seed: int = 0) -> KVLinkLlama:
    cfg, base = load_base(tiny["gguf"])
    m = KVLinkLlama(cfg, n_extra, lora_r=4 if lora else 0, lora_alpha=8)
    m.load_base(base)
    g = torch.Generator().manual_seed(seed)
    m.init_extra(g)
    with torch.no_grad():  # non-zero B so LoRA matters
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def test_qk_permutation_roundtrip():
    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    assert np.array_equal(gguf_to_hf_qk(hf_to_gguf_qk(w, 3), 3), w)
    assert not np.array_equal(hf_to_gguf_qk(w, 3), w)


def test_loader_unpermutes_qk(tiny):
    cfg, sd = load_base(tiny["gguf"])
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (2, 64, 4, 2, 128, 300, 16)
    assert cfg.tie_word_embeddings and cfg.name == "tiny-test" and cfg.rope_theta == TINY["theta"]
    assert set(sd) == set(tiny["hf"])
    for k, v in tiny["hf"].items():
        assert tuple(sd[k].shape) == v.shape, k
        assert np.array_equal(sd[k].numpy(), v), k


def test_mask_matches_double_loop():
    # prefix, S, doc1, links, doc2, links, E, tail, padding
    seg = [0, 0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0, 0, -1, -1]
    m = kvlink_mask(torch.tensor([seg]))
    assert m.shape == (1, 1, len(seg), len(seg))
    assert np.array_equal(m[0, 0].numpy(), loop_mask(seg))
    # batch of two with different padding
    seg2 = [0, 1, 1, 0, 2, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1]
    m2 = kvlink_mask(torch.tensor([seg, seg2]))
    assert np.array_equal(m2[1, 0].numpy(), loop_mask(seg2))


def test_mask_section1_layout():
    # KVLINK.md §1: [prefix][S][doc1][L1 x k][doc2][L2 x k][E][question][header]
    seg = [0, 0] + [0] + [1] * 4 + [0] * 2 + [2] * 3 + [0] * 2 + [0] + [0] * 3 + [0] * 2
    m = kvlink_mask(torch.tensor([seg]))[0, 0].numpy()
    assert np.array_equal(m, loop_mask(seg))
    idx = np.arange(len(seg))
    for t, s in enumerate(seg):
        if s > 0:  # documents see only earlier tokens of themselves
            assert set(idx[m[t]]) == {u for u in range(t + 1) if seg[u] == s}
        else:  # seg 0 sees every earlier token
            assert set(idx[m[t]]) == set(range(t + 1))


def _layout(rng, n1=5, n2=4):
    pre = list(rng.integers(1, 300, 3))
    d1 = list(rng.integers(1, 300, n1))
    d2 = list(rng.integers(1, 300, n2))
    tail = list(rng.integers(1, 300, 4))
    ids = pre + [KV_START] + d1 + [LINK_BASE, LINK_BASE + 1] + d2 + [LINK_BASE + 2, LINK_BASE + 3] + [KV_END] + tail
    seg = [0] * 4 + [1] * n1 + [0, 0] + [2] * n2 + [0, 0, 0] + [0] * 4
    return ids, seg


def _layers(m: KVLinkLlama, ids, pos, mask, override=None):
    """Manual layer loop; returns each layer's input [B,L,H] and the final normed hidden.
    override: (rows, list of per-layer inputs for those rows) replaced before each layer."""
    ang = pos.float()[..., None] * m.inv_freq
    ang = torch.cat((ang, ang), -1)[:, None]
    cos, sin = ang.cos(), ang.sin()
    h = m.embed(ids)
    ins = []
    for li, layer in enumerate(m.model.layers):
        if override is not None:
            rows, vals = override
            h = h.clone()
            h[0, rows] = vals[li]
        ins.append(h)
        h = layer(h, cos, sin, mask)
    return ins, m.model.norm(h)


def test_kvlink_invariant(tiny):
    torch.manual_seed(0)
    m = tiny_model(tiny)
    rng = np.random.default_rng(1)
    ids, seg = _layout(rng)
    L = len(ids)
    I = torch.tensor([ids])
    S = torch.tensor([seg])
    P = torch.arange(L)[None]
    with torch.no_grad():
        ins_full, h_full = _layers(m, I, P, kvlink_mask(S))
        assert torch.allclose(h_full, m.hidden(I, S, P), atol=1e-6)
        # each document alone at its global positions gives the same states at every layer
        doc_rows = []
        doc_ins = []
        for d in (1, 2):
            rows = [i for i in range(L) if seg[i] == d]
            ins_alone, h_alone = _layers(m, I[:, rows], P[:, rows], kvlink_mask(torch.zeros(1, len(rows), dtype=torch.long)))
            for li in range(len(ins_alone)):
                assert torch.allclose(ins_full[li][0, rows], ins_alone[li][0], atol=1e-6)
            assert torch.allclose(h_full[0, rows], h_alone[0], atol=1e-6)
            doc_rows += rows
            doc_ins.append(ins_alone)
        # tail: plain causal forward whose document rows are replaced, layer by layer, by the
        # states computed alone == the KVLink-masked forward
        vals = [torch.cat([doc_ins[0][li][0], doc_ins[1][li][0]]) for li in range(len(m.model.layers))]
        causal = kvlink_mask(torch.zeros(1, L, dtype=torch.long))
        _, h_ref = _layers(m, I, P, causal, override=(doc_rows, vals))
        tail = [i for i in range(L) if seg[i] == 0 and i >= 4]
        lg_full = m.lm_logits(h_full[0, tail])
        lg_ref = m.lm_logits(h_ref[0, tail])
        assert torch.allclose(lg_full, lg_ref, atol=1e-5)
        # and it is not the causal forward (the mask matters)
        lg_causal = m.lm_logits(m.hidden(I, torch.zeros_like(S), P)[0, tail])
        assert not torch.allclose(lg_full, lg_causal, atol=1e-3)
        # changing document 2 leaves document 1 (and the prefix) untouched, but changes the tail
        ids2 = list(ids)
        for i in range(L):
            if seg[i] == 2:
                ids2[i] = (ids2[i] + 7) % 300
        h2 = m.hidden(torch.tensor([ids2]), S, P)
        keep = [i for i in range(L) if seg[i] == 1 or i < 4]
        assert torch.equal(h2[0, keep], h_full[0, keep])
        assert not torch.allclose(h2[0, tail], h_full[0, tail], atol=1e-4)


def test_single_doc_equals_causal(tiny):
    # one document right after an empty prefix: KVLink == ordinary causal prefill
    m = tiny_model(tiny)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    seg = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    P = torch.arange(7)[None]
    with torch.no_grad():
        assert torch.allclose(m(ids, seg, P), m(ids, torch.zeros_like(seg), P), atol=1e-6)


def test_padding_rows_are_inert(tiny):
    m = tiny_model(tiny)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    seg = torch.tensor([[0, 1, 1, 0, -1, -1], [0, 1, 1, 0, 0, 0]])
    P = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        h = m.hidden(ids, seg, P)
        assert torch.isfinite(h).all()
        assert torch.allclose(h[0, :4], h[1, :4], atol=1e-6)
        assert torch.allclose(h[0, :4], m.hidden(ids[:1, :4], seg[:1, :4], P[:1, :4])[0], atol=1e-6)


def test_loss_counts_only_labelled(tiny):
    m = tiny_model(tiny)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    seg = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0]])
    P = torch.arange(8)[None]
    tgt = torch.full((1, 8), -100)
    tgt[0, 5:7] = ids[0, 6:8]  # rows 5, 6 predict tokens 6, 7
    with torch.no_grad():
        s, rows, tok = m.loss_sums(ids, seg, P, tgt)
        assert tok.numel() == 2 and rows.tolist() == [0, 0]
        logits = m(ids, seg, P)[0]
        ref = torch.nn.functional.cross_entropy(logits[5:7], ids[0, 6:8], reduction="sum")
        assert torch.allclose(s, ref, atol=1e-5)
        # unlabelled targets do not matter (the rows predicting them are skipped)
        tgt2 = tgt.clone()
        tgt2[0, 5] = 123
        assert not torch.allclose(m.loss_sums(ids, seg, P, tgt2)[0], s)
    from kvlink_train.data import Samples, collate

    def lsum(tokens: list[int], loss: list[int]) -> torch.Tensor:
        T = len(tokens)
        smp = Samples(np.array(tokens), np.array([0, 1, 1, 0, 0, 0, 0, 0]), np.arange(T), np.array(loss),
                      np.array([0, T]), np.array([0]), ["qa"], 300, "")
        b = collate(smp, [0])
        with torch.no_grad():
            return m.loss_sums(b["ids"], b["seg"], b["pos"], b["targets"])[0]

    toks = [3, 4, 5, 6, 7, 8, 9, 10]
    lab = [0, 0, 0, 0, 0, 1, 1, 0]  # tokens 5 and 6 are targets; 7 is not
    base = lsum(toks, lab)
    assert torch.equal(base, lsum(toks[:7] + [77], lab))  # unlabelled target: no effect
    assert not torch.allclose(base, lsum(toks[:6] + [77, 10], lab))  # labelled target: changes
    assert torch.equal(base, lsum(toks, [1] + lab[1:]))  # token 0 cannot be a target


def test_lm_head_excludes_extra_rows(tiny):
    m = tiny_model(tiny)
    ids = torch.tensor([[1, KV_START, 2, LINK_BASE, KV_END]])
    out = m(ids, torch.zeros_like(ids), torch.arange(5)[None])
    assert out.shape[-1] == TINY["vocab"]
    e = m.embed(ids)
    assert torch.equal(e[0, 1], m.model.extra_embeddings[KV_START - 300])
    assert torch.equal(e[0, 0], m.model.embed_tokens.weight[1])


def test_untied_head_and_rope_freqs(tmp_path, tiny):
    from conftest import write_tiny_gguf
    rng = np.random.default_rng(5)
    out = (rng.standard_normal((300, 64)) * 0.1).astype(np.float32)
    ff = np.linspace(1.0, 8.0, 8).astype(np.float32)  # head_dim 16 -> 8 frequencies
    p = str(tmp_path / "untied.gguf")
    write_tiny_gguf(p, tiny["hf"], output=out, rope_freqs=ff)
    cfg, sd = load_base(p)
    assert not cfg.tie_word_embeddings and np.array_equal(sd["lm_head.weight"].numpy(), out)
    assert cfg.rope_freq_factors == [float(x) for x in ff]
    m = KVLinkLlama(cfg, 0, lora_r=0)
    m.load_base(sd)
    inv = 1.0 / (TINY["theta"] ** (np.arange(0, 16, 2) / 16)) / ff
    assert np.allclose(m.inv_freq.numpy(), inv, rtol=1e-6)
    h = torch.randn(3, 64)
    assert torch.allclose(m.lm_logits(h), h @ torch.from_numpy(out).T, atol=1e-5)
