from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from conftest import KVLINK_JSON, TINY, make_samples
from kvlink_train import logits as logits_cli
from kvlink_train.base import load_base
from kvlink_train.data import collate, epoch_batches, load_samples, to_control
from kvlink_train.export import EXTRA_KEY, export_run
from kvlink_train.model import KVLinkLlama
from kvlink_train.train import Trainer, lr_at, main, parse_args


def args(tiny, run, *extra: str) -> list[str]:
    return ["--model", tiny["gguf"], "--samples", tiny["samples"], "--run", str(run), "--device", "cpu",
            "--lora-r", "4", "--lora-alpha", "8", "--batch-tokens", "256", "--warmup", "2", "--quiet", *extra]


def read_log(run) -> list[dict]:
    return [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]


def steps_of(run) -> list[dict]:
    return [r for r in read_log(run) if "loss" in r]


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)


def test_batches_respect_budget_and_cover_epoch(tiny):
    s = load_samples(tiny["samples"])
    bs = epoch_batches(s, 0, 0, 96)
    assert sorted(i for b in bs for i in b) == list(range(len(s)))
    for b in bs:
        L = -(-max(int(s.lengths()[i]) for i in b) // 8) * 8
        assert len(b) == 1 or len(b) * L <= 96
    assert epoch_batches(s, 0, 0, 96) == bs and epoch_batches(s, 1, 0, 96) != bs


def test_training_lowers_loss(tiny, tmp_path):
    run = tmp_path / "run"
    # one micro-batch holds every sample: the same batch each step
    main(args(tiny, run, "--steps", "25", "--lr", "1e-2", "--batch-tokens", "100000", "--save-every", "0"))
    ls = [r["loss"] for r in steps_of(run)]
    assert len(ls) == 25
    assert ls[-1] < 0.7 * ls[0], ls
    start = [json.loads(x) for x in open(run / "log.jsonl")][0]
    assert start["event"] == "start" and start["recipe"] == {"args": ["train-data", "--seed", "0"]}
    first = steps_of(run)[0]
    assert first["labelled"] == int(load_samples(tiny["samples"]).loss.sum())
    assert set(first["comp_loss"]) == {"qa_mem", "qa"}
    assert os.path.exists(run / "DONE") and os.path.exists(run / "adapter" / "adapter_model.safetensors")


def test_resume_is_exact(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--steps", "8", "--grad-accum", "2", "--lr", "5e-3", "--save-every", "3", "--batch-tokens", "128"]
    assert main(args(tiny, a, *common)) == "done"
    assert main(args(tiny, b, *common, "--stop-at-step", "5")) == "stopped"
    with pytest.raises(SystemExit):  # existing run without --resume
        main(args(tiny, b, *common))
    with pytest.raises(SystemExit):  # changed arguments
        main(args(tiny, b, "--steps", "9", *common[2:], "--resume"))
    assert main(args(tiny, b, *common, "--resume")) == "done"
    la, lb = steps_of(a), steps_of(b)
    assert [r["step"] for r in lb] == list(range(1, 9))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb] and la[-1]["epoch"] >= 1  # crossed an epoch
    ca = torch.load(a / "ckpt.pt", weights_only=False)
    cb = torch.load(b / "ckpt.pt", weights_only=False)
    for k, v in ca["trainable"].items():
        assert torch.equal(v, cb["trainable"][k]), k
    assert (ca["epoch"], ca["cursor"]) == (cb["epoch"], cb["cursor"])


def test_export_roundtrip(tiny, tmp_path):
    run = tmp_path / "run"
    main(args(tiny, run, "--steps", "3", "--lr", "1e-2", "--lora-alpha", "12"))
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    out = export_run(str(run), str(tmp_path / "adapter"))
    ac = json.load(open(os.path.join(out, "adapter_config.json")))
    assert ac["r"] == 4 and ac["lora_alpha"] == 12 and ac["peft_type"] == "LORA"
    assert ac["base_model_name_or_path"] == "tiny-test"
    kv = json.load(open(os.path.join(out, "kvlink.json")))
    src = json.loads(KVLINK_JSON)
    assert all(kv[k] == v for k, v in src.items())
    assert kv["extra_tokens"] == 10 and kv["base_vocab"] == 300
    assert kv["base_model"] == {"name": "tiny-test", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300}
    from safetensors import safe_open
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(EXTRA_KEY).dtype == torch.float16
        assert torch.equal(f.get_tensor(EXTRA_KEY), ck["trainable"]["model.extra_embeddings"].half())
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
        assert a.shape == (4, 64) and b.shape == (32, 4)
    assert len(keys) == 2 * 7 * 2 + 1
    # in-memory LoRA model with the same (f16-rounded) parameters vs. the merged reload from disk
    cfg, base = load_base(tiny["gguf"])
    m = KVLinkLlama(cfg, 10, lora_r=4, lora_alpha=12)
    m.load_base(base)
    with torch.no_grad():
        p = dict(m.named_parameters())
        for n, t in ck["trainable"].items():
            p[n].copy_(t.half().float())
    assert any(t.abs().max() > 0 for n, t in ck["trainable"].items() if n.endswith("lora_B"))
    merged = logits_cli.load_merged(tiny["gguf"], out)
    s = load_samples(tiny["samples"])
    bt = collate(s, list(range(4)))
    with torch.no_grad():
        x = m(bt["ids"], bt["seg"], bt["pos"])
        y = merged(bt["ids"], bt["seg"], bt["pos"])
        z = KVLinkLlama(cfg, 10, lora_r=0)
        z.load_base(base)
        z.model.extra_embeddings.copy_(p["model.extra_embeddings"])
        assert (z(bt["ids"], bt["seg"], bt["pos"]) - x).abs().max() > 1e-3  # the adapter matters
    valid = bt["seg"] >= 0
    assert torch.allclose(x[valid], y[valid], atol=2e-5, rtol=1e-5), (x - y)[valid].abs().max()


def test_logits_cli(tiny, tmp_path, capsys):
    out = logits_cli.main(["--model", tiny["gguf"], "--tokens", "1,2,3,4", "--segments", "0,1,1,0", "--top", "5"])
    assert len(out["logits_last"]) == 5
    lp = [t["logprob"] for t in out["logits_last"]]
    assert lp == sorted(lp, reverse=True) and lp[0] <= 0
    assert json.loads(capsys.readouterr().out.strip())["logits_last"] == out["logits_last"]
    eng = tmp_path / "engine.json"
    eng.write_text(json.dumps({"tokens": [1, 2, 3, 4], "segments": [0, 1, 1, 0], "positions": [0, 1, 2, 3],
                               "top": out["logits_last"]}))
    cmp = logits_cli.main(["--model", tiny["gguf"], "--engine-json", str(eng)])
    assert cmp["max_abs_logprob_diff"] < 1e-6 and cmp["top1_agree"]


def test_control(tiny, tmp_path):
    s = load_samples(tiny["samples"])
    c = to_control(s)
    assert len(c) == len(s)
    assert (c.tokens < 300).all() and (c.segments == 0).all()
    assert c.loss.sum() == s.loss.sum()
    for i in range(len(s)):
        t, g, p, lo = s.sample(i)
        keep = t < 300
        ct, cg, cp, cl = c.sample(i)
        assert np.array_equal(ct, t[keep]) and np.array_equal(cl, lo[keep])
        assert np.array_equal(cp, np.arange(len(ct)))
    kv = json.loads(c.kvlink_json)
    assert kv["k"] == 0 and "link_base" not in kv and "kv_start" not in kv
    run = tmp_path / "ctl"
    main(args(tiny, run, "--steps", "2", "--control"))
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    assert "model.extra_embeddings" not in ck["trainable"]
    kj = json.load(open(run / "adapter" / "kvlink.json"))
    assert kj["k"] == 0 and kj["extra_tokens"] == 0 and "link_base" not in kj
    from safetensors import safe_open
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert EXTRA_KEY not in f.keys()


def test_samples_file_layout(tmp_path):
    p = make_samples(str(tmp_path / "s.safetensors"), n=5, seed=3)
    from safetensors import safe_open
    with safe_open(p, "np") as f:
        meta = f.metadata()
        dt = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert meta["format"] == "kvlink-train-samples/1" and meta["base_vocab"] == "300"
    assert dt == {"tokens": np.uint32, "segments": np.uint8, "positions": np.int32, "loss": np.uint8,
                  "offsets": np.int64, "component": np.uint8}
    s = load_samples(p)
    assert s.n_extra() == 10 and s.components == ["qa_mem", "qa"] and len(s) == 5


def test_chunked_ce_matches(tiny):
    cfg, base = load_base(tiny["gguf"])
    s = load_samples(tiny["samples"])
    bt = collate(s, list(range(len(s))))
    grads = []
    losses = []
    for chunk in (10**9, 7):
        torch.manual_seed(0)
        m = KVLinkLlama(cfg, 10, lora_r=4, lora_alpha=8)
        m.load_base(base)
        m.init_extra(torch.Generator().manual_seed(1))
        m.train()
        m.ce_chunk = chunk
        loss, _, tok = m.loss_sums(bt["ids"], bt["seg"], bt["pos"], bt["targets"])
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    # chunking reorders f32 sums whose terms reach the gradient's scale: a few ulps of
    # the largest element, absolute (a small element can carry a large one's rounding)
    scale = grads[0].abs().max()
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6 * float(scale))


def test_bf16_path_and_max_minutes(tiny, tmp_path):
    # the CUDA code path (bf16 frozen weights + autocast), here on CPU; --max-minutes stops after
    # the first step with a checkpoint
    run = tmp_path / "bf"
    assert main(args(tiny, run, "--steps", "5", "--bf16", "--max-minutes", "0.01")) == "stopped"
    ls = steps_of(run)
    assert len(ls) == 1 and np.isfinite(ls[0]["loss"])
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    assert ck["step"] == 1 and all(t.dtype == torch.float32 for t in ck["trainable"].values())
    assert main(args(tiny, run, "--steps", "5", "--bf16", "--resume")) == "done"
    assert [r["step"] for r in steps_of(run)] == [1, 2, 3, 4, 5]


def test_init_adapter_warm_restart(tiny, tmp_path):
    from safetensors.torch import load_file
    first = tmp_path / "first"
    main(args(tiny, first, "--steps", "3", "--lr", "1e-2"))
    ad = first / "adapter"
    # a step of lr 1e-12 moves no weight by an f16 ulp: the run must start from, and so
    # export, exactly the adapter's (f16) values
    same = tmp_path / "same"
    main(args(tiny, same, "--steps", "1", "--lr", "1e-12", "--init-adapter", str(ad)))
    a, b = load_file(str(ad / "adapter_model.safetensors")), load_file(str(same / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_B.weight"))
    # it continues from there: its first loss is the trained one, below a fresh run's
    cont = tmp_path / "cont"
    main(args(tiny, cont, "--steps", "1", "--lr", "1e-2", "--init-adapter", str(ad)))
    fresh = tmp_path / "fresh"
    main(args(tiny, fresh, "--steps", "1", "--lr", "1e-2"))
    assert steps_of(cont)[0]["loss"] < steps_of(fresh)[0]["loss"] - 0.05
    # a mismatched adapter is refused with a clear message
    with pytest.raises(ValueError, match="link-token adapter, but this is a control run"):
        main(args(tiny, tmp_path / "c", "--steps", "1", "--control", "--init-adapter", str(ad)))
    with pytest.raises(ValueError, match="shape"):
        main(args(tiny, tmp_path / "r", "--steps", "1", "--lora-r", "8", "--init-adapter", str(ad)))
    with pytest.raises(SystemExit, match="alpha"):
        main(args(tiny, tmp_path / "al", "--steps", "1", "--lora-alpha", "4", "--init-adapter", str(ad)))


def test_bad_lr_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "z", "--steps", "1", "--lr", "0"))
    assert "--lr must be > 0" in capsys.readouterr().err


def _unit_grad(m) -> torch.Tensor:
    g = torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
    return g / g.norm()


@pytest.mark.parametrize("weight", ["token", "sample"])
def test_loss_weight(tiny, tmp_path, weight):
    # one micro-batch holds every sample; the step's gradient (clipped, so compared as a
    # direction) must be that of the mean over tokens, or of the mean over samples of each
    # sample's mean, computed here one sample at a time
    t = Trainer(parse_args(args(tiny, tmp_path / weight, "--steps", "1", "--lr", "1e-12", "--batch-tokens", "100000",
                                "--loss-weight", weight)))
    t.t_train = time.time()
    t.train_step()
    got = _unit_grad(t.model)
    s = t.samples
    labelled = [int(s.sample(i)[3].sum()) for i in range(len(s))]
    assert min(labelled) > 0 and max(labelled) > 2 * min(labelled), labelled  # the weightings differ
    losses = {}
    for w in ("token", "sample"):
        t.model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for i in range(len(s)):
            b = collate(s, [i], 8, t.device)
            ls, _, tok = t.model.loss_sums(b["ids"], b["seg"], b["pos"], b["targets"])
            total = total + (ls / sum(labelled) if w == "token" else tok.mean() / len(s))
        total.backward()
        losses[w] = _unit_grad(t.model)
    other = "sample" if weight == "token" else "token"
    assert torch.allclose(got, losses[weight], atol=1e-4), (got - losses[weight]).abs().max()
    assert not torch.allclose(got, losses[other], atol=1e-2)


def test_export_every_and_old_checkpoints(tiny, tmp_path):
    from safetensors.torch import load_file
    run = tmp_path / "ex"
    main(args(tiny, run, "--steps", "4", "--lr", "1e-2", "--export-every", "2", "--save-every", "3"))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("adapter")) == ["adapter", "adapter-step2"]
    a = load_file(str(run / "adapter-step2" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert (run / "adapter-step2" / "adapter_config.json").exists()
    # a checkpoint from before --loss-weight existed resumes as token weighting, and only so
    part = tmp_path / "part"
    main(args(tiny, part, "--steps", "4", "--stop-at-step", "2"))
    ck = torch.load(part / "ckpt.pt", weights_only=False)
    del ck["args"]["loss_weight"]
    torch.save(ck, part / "ckpt.pt")
    with pytest.raises(SystemExit, match="loss_weight"):
        main(args(tiny, part, "--steps", "4", "--resume", "--loss-weight", "sample"))
    assert main(args(tiny, part, "--steps", "4", "--resume")) == "done"


def _reference_kl(m, s, i: int, rows: str) -> torch.Tensor:
    """Per-row KL(full || kvlink) of sample i, from two plain forwards: the sample as laid
    out (KV-START, documents, links, KV-END, question, answer) and its control layout."""
    import torch.nn.functional as F
    from conftest import KV_END
    ctl = to_control(s)
    b, tb = collate(s, [i]), collate(ctl, [i])
    ls = F.log_softmax(m(b["ids"], b["seg"], b["pos"])[0], -1)
    with torch.no_grad():  # the teacher gets no gradient
        lt = F.log_softmax(m(tb["ids"], tb["seg"], tb["pos"])[0], -1)
    n, nt = int(s.lengths()[i]), int(ctl.lengths()[i])
    if rows == "tail":
        # what follows KV-END (the samples' last memory token), less the last token
        T = n - 1 - int(np.flatnonzero(s.sample(i)[0] == KV_END)[-1])
        sr, tr = list(range(n - T, n - 1)), list(range(nt - T, nt - 1))
    else:
        sr = (b["targets"][0] >= 0).nonzero()[:, 0].tolist()
        tr = (tb["targets"][0] >= 0).nonzero()[:, 0].tolist()
    assert len(sr) == len(tr) > 0
    return (lt[tr].exp() * (lt[tr] - ls[sr])).sum(-1)


@pytest.mark.parametrize("weight,rows", [("token", "tail"), ("sample", "answer")])
def test_distill_matches_reference(tiny, tmp_path, weight, rows):
    # one micro-batch holds every sample; the logged KL and the step's gradient (a
    # direction: clipped) must be those of CE + W x KL computed here one sample at a time
    W = 3.0
    t = Trainer(parse_args(args(tiny, tmp_path / rows, "--steps", "1", "--lr", "1e-12", "--batch-tokens", "100000",
                                "--loss-weight", weight, "--distill", str(W), "--distill-rows", rows,
                                "--init-adapter", str(_adapter(tiny, tmp_path)))))
    t.t_train = time.time()
    rec = t.train_step()
    got = _unit_grad(t.model)
    s = t.samples
    mem = [i for i in range(len(s)) if (s.sample(i)[0] >= s.base_vocab).any()]
    assert 0 < len(mem) < len(s)  # the plain (qa) samples are not distilled
    t.model.zero_grad(set_to_none=True)
    labelled = sum(int(s.sample(i)[3].sum()) for i in range(len(s)))
    kls = {i: _reference_kl(t.model, s, i, rows) for i in mem}
    n_kl = sum(len(k) for k in kls.values())
    assert rec["kl_rows"] == n_kl
    assert rec["kl"] == pytest.approx(float(sum(k.detach().sum() for k in kls.values())) / n_kl, abs=2e-5)
    assert rec["kl"] > 1e-3  # the layouts differ: reuse changes the predictions
    ce = torch.zeros(())
    for i in range(len(s)):
        b = collate(s, [i])
        ls, _, tok = t.model.loss_sums(b["ids"], b["seg"], b["pos"], b["targets"])
        ce = ce + (ls / labelled if weight == "token" else tok.mean() / len(s))
    kl = sum(k.sum() / n_kl if weight == "token" else k.mean() / len(mem) for k in kls.values())
    (ce + W * kl).backward(retain_graph=True)
    want = _unit_grad(t.model)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # and the KL term moves it: CE alone points elsewhere
    t.model.zero_grad(set_to_none=True)
    ce.backward()
    assert not torch.allclose(got, _unit_grad(t.model), atol=1e-2)


def _adapter(tiny, tmp_path):
    """A trained adapter (so the link rows and LoRA are not at their initial values)."""
    run = tmp_path / "pre"
    if not (run / "adapter").exists():
        main(args(tiny, run, "--steps", "3", "--lr", "1e-2", "--save-every", "0"))
    return run / "adapter"


def test_distill_lowers_kl_and_checks_its_arguments(tiny, tmp_path, capsys):
    run = tmp_path / "d"
    main(args(tiny, run, "--steps", "20", "--lr", "1e-2", "--batch-tokens", "100000", "--save-every", "0",
              "--distill", "10"))
    kl = [r["kl"] for r in steps_of(run)]
    assert kl[-1] < 0.5 * kl[0], kl
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "c", "--steps", "1", "--control", "--distill", "1"))
    assert "--distill needs the link-token layout" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not components"):
        main(args(tiny, tmp_path / "u", "--steps", "1", "--distill", "1", "--distill-components", "text_mem"))
    part = tmp_path / "part"
    main(args(tiny, part, "--steps", "4", "--stop-at-step", "2", "--distill", "1"))
    with pytest.raises(SystemExit, match="distill"):
        main(args(tiny, part, "--steps", "4", "--resume", "--distill", "2"))
    assert main(args(tiny, part, "--steps", "4", "--resume", "--distill", "1")) == "done"
