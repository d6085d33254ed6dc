"""Train LoRA + link-token rows with the KVLink mask (or the causal control run).

python -m kvlink_train.train --model M.gguf --samples S.safetensors --run RUN [--control] [--resume]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from .base import load_base
from .data import Samples, collate, epoch_batches, load_samples, tail_lengths, to_control
from .export import export_adapter, read_trainable
from .model import KVLinkLlama

# Arguments that must not change between a run and its resumption.
FIXED = ["control", "init_adapter", "loss_weight", "distill", "distill_rows", "distill_components", "steps", "batch_tokens", "grad_accum", "lr", "extra_lr", "warmup", "min_lr_ratio",
         "lora_r", "lora_alpha", "lora_dropout", "seed", "pad_to", "beta2", "weight_decay"]

# What a checkpoint written before an argument existed ran with.
FIXED_DEFAULTS = {"loss_weight": "token", "distill": 0.0, "distill_rows": "tail", "distill_components": None}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvlink_train.train", description=__doc__)
    p.add_argument("--model", required=True, help="base llama GGUF (or a .safetensors from kvlink_train.base)")
    p.add_argument("--samples", required=True, help="samples file from `kvlink train-data`")
    p.add_argument("--run", required=True, help="run folder: log.jsonl, ckpt.pt, adapter/")
    p.add_argument("--control", action="store_true", help="causal attention, no link tokens (upper-bound control)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-tokens", type=int, default=32768, help="tokens per micro-batch incl. padding")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--extra-lr", type=float, default=None, help="lr of the extra embedding rows (default: --lr)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of lr")
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--loss-weight", choices=["token", "sample"], default="token",
                   help="token: every labelled token weighs the same (samples with long answers dominate); "
                        "sample: every sample weighs the same, its tokens share its weight (a QA answer of "
                        "five tokens counts as much as a continuation of 800)")
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="self-distillation weight: add W x the mean KL(full || kvlink) of the next-token "
                        "distributions, the teacher being the model itself (no gradient) on the same sample "
                        "with plain causal attention and no link tokens, the student the sample as laid out "
                        "for reuse; it pulls reuse toward what full prefill predicts (0 = off)")
    p.add_argument("--distill-rows", choices=["tail", "answer"], default="tail",
                   help="rows the KL is taken at: tail = every token after the documents (question and "
                        "answer, a text's continuation), answer = the labelled tokens only")
    p.add_argument("--distill-components", default=None, metavar="A,B",
                   help="components whose samples are distilled (default: every *_mem component)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad-to", type=int, default=8, help="pad batch length to a multiple of this")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--export-every", type=int, default=0,
                   help="also export RUN/adapter-step<N> every N steps (checkpoints to pick on validation data)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="save and stop before this wall time (0 = none)")
    p.add_argument("--stop-at-step", type=int, default=0, help="save and stop once this step is reached")
    p.add_argument("--resume", action="store_true", help="continue RUN/ckpt.pt if it exists")
    p.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start from this exported adapter's LoRA and extra rows (a warm restart: new "
                        "optimizer state and schedule); same r, alpha and kind of run (--control)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--bf16", action="store_true", help="bf16 base weights + autocast also on CPU (always on CUDA)")
    p.add_argument("--export", default=None, help="adapter folder written at the end (default RUN/adapter)")
    p.add_argument("--quiet", action="store_true", help="log to RUN/log.jsonl only")
    a = p.parse_args(argv)
    if a.export_every < 0 or a.save_every < 0:
        p.exit(2, f"{p.prog}: --save-every and --export-every must be >= 0\n")
    if not a.distill >= 0:
        p.exit(2, f"{p.prog}: --distill must be >= 0 (got {a.distill})\n")
    if a.distill > 0 and a.control:
        p.exit(2, f"{p.prog}: --distill needs the link-token layout; a --control run has none\n")
    if not a.lr > 0 or (a.extra_lr is not None and not a.extra_lr >= 0):
        p.exit(2, f"{p.prog}: --lr must be > 0 and --extra-lr >= 0 (got {a.lr}, {a.extra_lr})\n")
    return a


def lr_at(step: int, lr: float, warmup: int, steps: int, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to floor*lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * prog)))


def _recipe(text: str):
    """The samples file's recipe for the log: its JSON, the text if it is not JSON, None
    if the file has none (made before recipes were recorded)."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _save(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.time()
        dev = args.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda or args.bf16
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        os.makedirs(args.run, exist_ok=True)
        self.ckpt_path = os.path.join(args.run, "ckpt.pt")
        ck = None
        if os.path.exists(self.ckpt_path):
            if not args.resume:
                raise SystemExit(f"{self.ckpt_path} exists: pass --resume to continue it, or use another --run")
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            bad = [k for k in FIXED if ck["args"].get(k, FIXED_DEFAULTS.get(k)) != getattr(args, k)]
            if bad:
                raise SystemExit(f"--resume with changed arguments {bad}: "
                                 + ", ".join(f"{k}={ck['args'].get(k)!r}" for k in bad))

        s = load_samples(args.samples)
        self.samples: Samples = to_control(s) if args.control else s
        self.n_extra = 0 if args.control else self.samples.n_extra()
        self.distill_setup(s)
        if ck is not None and (ck["meta"]["n_samples"], ck["meta"]["n_tokens"]) != (len(s), len(s.tokens)):
            raise SystemExit("--resume with a different samples file")
        cfg, base = load_base(args.model)
        torch.manual_seed(args.seed)
        model = KVLinkLlama(cfg, self.n_extra, args.lora_r, args.lora_alpha, args.lora_dropout)
        model.load_base(base)
        del base
        model.init_extra(torch.Generator().manual_seed(args.seed + 1))
        if args.init_adapter:
            init, ac = read_trainable(args.init_adapter, model.trainable_state(), args.control)
            if (int(ac["r"]), float(ac["lora_alpha"])) != (args.lora_r, float(args.lora_alpha)):
                raise SystemExit(f"--init-adapter {args.init_adapter}: r {ac['r']}, alpha {ac['lora_alpha']}; "
                                 f"this run has --lora-r {args.lora_r} --lora-alpha {args.lora_alpha}")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n, t in init.items():
                    params[n].copy_(t)
        if self.amp:
            model.freeze_base_to(torch.bfloat16)
        model.grad_checkpointing = args.grad_ckpt
        self.model = model.to(self.device).train()
        self.meta = {
            "config": cfg.to_dict(), "kvlink_json": self.samples.kvlink_json, "base_vocab": self.samples.base_vocab,
            "n_extra": self.n_extra, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout, "control": args.control, "components": self.samples.components,
            "n_samples": len(s), "n_tokens": len(s.tokens), "init_adapter": args.init_adapter,
        }
        extra_lr = args.extra_lr if args.extra_lr is not None else args.lr
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if "lora_" in n], "base_lr": args.lr}]
        if self.n_extra:
            groups.append({"params": [p for n, p in named if n == "model.extra_embeddings"], "base_lr": extra_lr})
        self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-8,
                                     weight_decay=args.weight_decay)
        self.step, self.epoch, self.cursor = 0, 0, 0
        self.tokens_total, self.elapsed_before = 0, 0.0
        if ck is not None:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for n, t in ck["trainable"].items():
                    params[n].copy_(t)
            self.opt.load_state_dict(ck["optim"])
            self.step, self.epoch, self.cursor = ck["step"], ck["epoch"], ck["cursor"]
            self.tokens_total, self.elapsed_before = ck["tokens_total"], ck["elapsed"]
            torch.set_rng_state(ck["rng"]["cpu"])
            if self.cuda and ck["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        self.batches = epoch_batches(self.samples, self.epoch, args.seed, args.batch_tokens, args.pad_to)
        self.log_f = open(os.path.join(args.run, "log.jsonl"), "a")
        self.log({"event": "resume" if ck else "start", "step": self.step, "device": str(self.device),
                  "samples": len(self.samples), "tokens": int(len(self.samples.tokens)),
                  "labelled": int(self.samples.loss.sum()), "n_extra": self.n_extra,
                  "trainable_params": sum(p.numel() for _, p in named),
                  "batches_per_epoch": len(self.batches), "load_s": round(time.time() - self.t0, 2),
                  "recipe": _recipe(self.samples.recipe)})

    def distill_setup(self, s: Samples) -> None:
        """--distill: the teacher's samples (the control layout of the same samples, same
        order), which samples are distilled and at how many rows each."""
        a = self.args
        self.teacher: Optional[Samples] = None
        self.kl_rows = np.zeros(len(s), np.int64)  # per sample; none without --distill
        if not a.distill > 0:
            return
        names = a.distill_components.split(",") if a.distill_components else \
            [c for c in s.components if c.endswith("_mem")]
        unknown = [n for n in names if n not in s.components]
        if unknown or not names:
            raise SystemExit(f"--distill-components {names}: not components of {a.samples} ({s.components})")
        self.teacher = to_control(s)
        self.tails = tail_lengths(s)
        ids = [s.components.index(n) for n in names]
        self.distilled = np.isin(s.component, ids) & (self.tails >= 2)
        for i in np.flatnonzero(self.distilled):
            t, tt = s.sample(i)[0], self.teacher.sample(i)[0]
            if not np.array_equal(t[len(t) - self.tails[i]:], tt[len(tt) - self.tails[i]:]):
                raise SystemExit(f"sample {i}: its tail differs between the two layouts")
        if a.distill_rows == "tail":
            self.kl_rows = self.tails - 1
        else:
            self.kl_rows = np.add.reduceat(s.loss.astype(np.int64), s.offsets[:-1])
        self.kl_rows = np.where(self.distilled, self.kl_rows, 0)
        if not self.kl_rows.any():
            raise SystemExit(f"--distill: no sample of {names} has rows to distill")

    def distill_rows(self, idx: list[int], b: dict, tb: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of the rows the KL is taken at, in the student's batch b and the
        teacher's batch tb (its row j = the student's row rows[j]); equal counts per
        sample, in the same order."""
        if self.args.distill_rows == "answer":
            sm = torch.zeros_like(b["targets"], dtype=torch.bool)
            sm[rows] = b["targets"][rows] >= 0
            return sm, tb["targets"] >= 0
        sm = torch.zeros(b["ids"].shape, dtype=torch.bool)
        tm = torch.zeros(tb["ids"].shape, dtype=torch.bool)
        lens, tlens = self.samples.lengths(), self.teacher.lengths()
        for j, r in enumerate(rows):
            i = idx[r]
            n, nt, T = int(lens[i]), int(tlens[i]), int(self.tails[i])
            sm[r, n - T:n - 1] = True
            tm[j, nt - T:nt - 1] = True
        return sm.to(b["ids"].device), tm.to(b["ids"].device)

    def log(self, rec: dict) -> None:
        line = json.dumps(rec)
        self.log_f.write(line + "\n")
        self.log_f.flush()
        if not self.args.quiet:
            print(line, flush=True)

    def next_batch(self) -> list[int]:
        if self.cursor >= len(self.batches):
            self.epoch += 1
            self.cursor = 0
            self.batches = epoch_batches(self.samples, self.epoch, self.args.seed, self.args.batch_tokens,
                                         self.args.pad_to)
        b = self.batches[self.cursor]
        self.cursor += 1
        return b

    def save(self) -> None:
        _save(self.ckpt_path, {
            "version": 1, "step": self.step, "epoch": self.epoch, "cursor": self.cursor,
            "trainable": {n: t.cpu() for n, t in self.model.trainable_state().items()},
            "optim": self.opt.state_dict(), "args": vars(self.args), "meta": self.meta,
            "tokens_total": self.tokens_total, "elapsed": self.elapsed_before + time.time() - self.t_train,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.cuda else None},
        })

    def train_step(self) -> dict:
        a = self.args
        t = time.time()
        idxs = [self.next_batch() for _ in range(a.grad_accum)]
        batches = [collate(self.samples, idx, a.pad_to, self.device) for idx in idxs]
        n_lab = sum(int((b["targets"] >= 0).sum()) for b in batches)
        # --distill: rows and samples of the step the KL is taken at
        n_kl = sum(int(self.kl_rows[i]) for idx in idxs for i in idx)
        n_kl_samples = sum(int(self.kl_rows[i] > 0) for idx in idxs for i in idx)
        kl_total = torch.zeros((), device=self.device)
        # --loss-weight sample: the step's loss is the mean over samples of each sample's mean
        sample = a.loss_weight == "sample"
        n_rows = sum(int((b["targets"] >= 0).any(dim=1).sum()) for b in batches) if sample else 0
        lr = lr_at(self.step, a.lr, a.warmup, a.steps, a.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["base_lr"] / a.lr
        self.opt.zero_grad(set_to_none=True)
        nc = max(1, len(self.samples.components))
        comp_sum = torch.zeros(nc, device=self.device)
        comp_n = torch.zeros(nc, device=self.device)
        loss_total = torch.zeros((), device=self.device)
        tokens = padded = 0
        for idx, b in zip(idxs, batches):
            kl_part = torch.zeros((), device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                h = self.model.hidden(b["ids"], b["seg"], b["pos"])
                s, row, tok = self.model.ce_sums(h, b["targets"])
                rows = [r for r, i in enumerate(idx) if self.kl_rows[i] > 0]
                if rows:
                    tb = collate(self.teacher, [idx[r] for r in rows], a.pad_to, self.device)
                    with torch.no_grad():
                        ht = self.model.hidden(tb["ids"], tb["seg"], tb["pos"])
                    sm, tm = self.distill_rows(idx, b, tb, rows)
                    kl = self.model.distill_kl(h[sm], ht[tm])
                    kl_total += kl.detach().sum()
                    if sample:
                        krow = sm.nonzero(as_tuple=True)[0]
                        per = torch.bincount(krow, minlength=b["ids"].shape[0])
                        kl_part = (kl / per[krow]).sum() / n_kl_samples
                    else:
                        kl_part = kl.sum() / n_kl
            if sample:
                per_row = torch.bincount(row, minlength=b["ids"].shape[0])
                ((tok.float() / per_row[row]).sum().div(max(1, n_rows)) + a.distill * kl_part).backward()
            else:
                (s / max(1, n_lab) + a.distill * kl_part).backward()
            loss_total += s.detach()
            c = b["comp"][row].clamp(max=nc - 1)
            comp_sum.index_add_(0, c, tok.detach())
            comp_n.index_add_(0, c, torch.ones_like(tok.detach()))
            tokens += int((b["seg"] >= 0).sum())
            padded += b["ids"].numel()
        gn = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.step += 1
        self.tokens_total += tokens
        loss = float(loss_total) / max(1, n_lab)
        dt = time.time() - t
        comps = {}
        for i, name in enumerate(self.samples.components or ["all"]):
            if comp_n[i] > 0:
                comps[name] = round(float(comp_sum[i] / comp_n[i]), 4)
        return {"step": self.step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(float(gn), 4),
                "tokens": tokens, "padded_tokens": padded, "labelled": n_lab, "tok_s": round(tokens / dt, 1),
                "step_s": round(dt, 3), "elapsed": round(self.elapsed_before + time.time() - self.t_train, 1),
                "epoch": self.epoch, "comp_loss": comps,
                **({"kl": round(float(kl_total) / max(1, n_kl), 5), "kl_rows": n_kl} if self.teacher is not None else {}),
                **({"mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)} if self.cuda else {})}

    def run(self) -> str:
        a = self.args
        self.t_train = time.time()
        recent: list[float] = []
        status = "done"
        while self.step < a.steps:
            if a.stop_at_step and self.step >= a.stop_at_step:
                status = "stopped"
                break
            if a.max_minutes > 0 and recent:
                est = max(recent[-5:]) * 1.3 + 15.0
                if time.time() - self.t0 + est > a.max_minutes * 60:
                    status = "stopped"
                    break
            t = time.time()
            self.log(self.train_step())
            recent.append(time.time() - t)
            if a.save_every and self.step % a.save_every == 0 and self.step < a.steps:
                self.save()
            if a.export_every and self.step % a.export_every == 0 and self.step < a.steps:
                export_adapter(self.model.trainable_state(), self.meta,
                               os.path.join(a.run, f"adapter-step{self.step}"))
        self.save()
        if status == "done":
            out = a.export or os.path.join(a.run, "adapter")
            export_adapter(self.model.trainable_state(), self.meta, out)
            with open(os.path.join(a.run, "DONE"), "w") as f:
                f.write(out + "\n")
        self.log({"event": status, "step": self.step, "elapsed": round(self.elapsed_before + time.time() - self.t_train, 1)})
        self.log_f.close()
        return status


def main(argv: Optional[list[str]] = None) -> str:
    return Trainer(parse_args(argv)).run()


if __name__ == "__main__":
    main(sys.argv[1:])
