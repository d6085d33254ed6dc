"""Samples files (`kvlink train-data` output), the control transform, and token-budget batching."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

FORMAT = "kvlink-train-samples/1"


@dataclass
class Samples:
    tokens: np.ndarray  # int64 [T]
    segments: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    loss: np.ndarray  # int64 [T], 1 = prediction target
    offsets: np.ndarray  # int64 [n+1]
    component: np.ndarray  # int64 [n]
    components: list[str]
    base_vocab: int
    kvlink_json: str
    recipe: str = ""  # how the file was made (JSON: `kvlink train-data` args), if recorded

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.segments[a:b], self.positions[a:b], self.loss[a:b]

    def kvlink(self) -> dict:
        return json.loads(self.kvlink_json) if self.kvlink_json else {}

    def n_extra(self) -> int:
        """Extra input rows needed: from the link config (slots x k + markers) and the data."""
        c = self.kvlink()
        if "extra_tokens" in c:
            n = int(c["extra_tokens"])
        else:
            top = self.base_vocab - 1
            if c.get("link_base") is not None and int(c.get("k", 0)) > 0:
                top = max(top, int(c["link_base"]) + int(c["k"]) * int(c.get("max_slots", 0) or 0) - 1)
            for key in ("kv_start", "kv_end"):
                if c.get(key) is not None:
                    top = max(top, int(c[key]))
            n = top - self.base_vocab + 1
        if len(self.tokens):
            n = max(n, int(self.tokens.max()) - self.base_vocab + 1)
        return max(n, 0)


def load_samples(path: str) -> Samples:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        t = {k: f.get_tensor(k).astype(np.int64) for k in
             ("tokens", "segments", "positions", "loss", "offsets", "component")}
    s = Samples(t["tokens"], t["segments"], t["positions"], t["loss"], t["offsets"], t["component"],
                [c for c in meta.get("components", "").split(",") if c], int(meta["base_vocab"]),
                meta.get("kvlink_json", ""), meta.get("recipe", ""))
    n = len(s)
    if s.offsets[0] != 0 or s.offsets[-1] != len(s.tokens) or len(s.component) != n or np.any(np.diff(s.offsets) <= 0):
        raise ValueError(f"{path}: inconsistent offsets/component")
    return s


def write_samples(path: str, samples: Sequence[dict], components: Sequence[str], base_vocab: int,
                  kvlink_json: str, recipe: str = "") -> None:
    """Write a samples file; each sample is a dict of tokens, segments, positions, loss, component."""
    from safetensors.numpy import save_file

    cat = lambda k, dt: np.concatenate([np.asarray(s[k], dtype=dt) for s in samples])  # noqa: E731
    offsets = np.concatenate([[0], np.cumsum([len(s["tokens"]) for s in samples])]).astype(np.int64)
    save_file({
        "tokens": cat("tokens", np.uint32), "segments": cat("segments", np.uint8),
        "positions": cat("positions", np.int32), "loss": cat("loss", np.uint8), "offsets": offsets,
        "component": np.asarray([s["component"] for s in samples], dtype=np.uint8),
    }, path, metadata={"format": FORMAT, "components": ",".join(components), "base_vocab": str(base_vocab),
                       "kvlink_json": kvlink_json, "recipe": recipe})


def to_control(s: Samples) -> Samples:
    """The fine-tuned upper bound: drop link tokens and markers (ids >= base_vocab), all
    segments 0, positions 0..L'-1, loss labels of the kept tokens kept."""
    keep = s.tokens < s.base_vocab
    kept_per_sample = np.add.reduceat(keep.astype(np.int64), s.offsets[:-1])
    offsets = np.concatenate([[0], np.cumsum(kept_per_sample)]).astype(np.int64)
    pos = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], kept_per_sample)
    c = s.kvlink()
    ctl = {k: v for k, v in c.items() if k not in ("link_base", "kv_start", "kv_end", "max_slots", "extra_tokens")}
    ctl["k"] = 0
    ctl["control"] = True
    return replace(s, tokens=s.tokens[keep], segments=np.zeros(int(keep.sum()), np.int64), positions=pos,
                   loss=s.loss[keep], offsets=offsets, kvlink_json=json.dumps(ctl))


def tail_lengths(s: Samples) -> np.ndarray:
    """Per sample, how many tokens follow its last memory token (a token of a document
    segment, a link token or a marker): the question and answer of a QA sample, the
    continuation of a text one. 0 for a sample without memory. [`to_control`] keeps
    these tokens, in the same order, as the last ones of the sample."""
    out = np.zeros(len(s), np.int64)
    for i in range(len(s)):
        t, g, _, _ = s.sample(i)
        mem = np.flatnonzero((g > 0) | (t >= s.base_vocab))
        if len(mem):
            out[i] = len(t) - 1 - int(mem[-1])
    return out


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def pack_batches(lengths: np.ndarray, order: Sequence[int], batch_tokens: int, pad_to: int = 8) -> list[list[int]]:
    """Greedy packing in the given order: a micro-batch holds rows while rows x padded max
    length <= batch_tokens (a sample longer than the budget goes alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = int(lengths[i])
        m = _round_up(max(cur_max, n), pad_to)
        if cur and (len(cur) + 1) * m > batch_tokens:
            out.append(cur)
            cur, cur_max = [], 0
        cur.append(int(i))
        cur_max = max(cur_max, n)
    if cur:
        out.append(cur)
    return out


# Samples are shuffled, then sorted by length within windows of this many, so a
# micro-batch holds samples of similar length (little padding); the batches are shuffled.
SORT_WINDOW = 512


def epoch_batches(s: Samples, epoch: int, seed: int, batch_tokens: int, pad_to: int = 8) -> list[list[int]]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(s))
    lengths = s.lengths()
    windows = [order[i:i + SORT_WINDOW] for i in range(0, len(order), SORT_WINDOW)]
    order = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in windows]) if windows else order
    batches = pack_batches(lengths, order, batch_tokens, pad_to)
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(s: Samples, idx: Sequence[int], pad_to: int = 8, device: Optional[torch.device] = None
            ) -> dict[str, torch.Tensor]:
    """Right-padded batch: ids, seg (-1 = pad), pos, targets (next token where labelled, else -100),
    comp (component per row)."""
    L = _round_up(max(int(s.offsets[i + 1] - s.offsets[i]) for i in idx), pad_to)
    B = len(idx)
    ids = np.zeros((B, L), np.int64)
    seg = np.full((B, L), -1, np.int64)
    pos = np.zeros((B, L), np.int64)
    tgt = np.full((B, L), -100, np.int64)
    for r, i in enumerate(idx):
        t, g, p, lo = s.sample(i)
        n = len(t)
        ids[r, :n], seg[r, :n], pos[r, :n] = t, g, p
        lab = (lo[1:] > 0) & (t[1:] < s.base_vocab)  # extra ids are never predicted
        tgt[r, : n - 1] = np.where(lab, t[1:], -100)
    comp = s.component[np.asarray(idx, dtype=np.int64)]
    b = {"ids": ids, "seg": seg, "pos": pos, "targets": tgt, "comp": comp}
    return {k: torch.from_numpy(v).to(device) if device is not None else torch.from_numpy(v) for k, v in b.items()}
