#!/usr/bin/env python3
"""Where a reuse gap sits in the context: EM by the position of the supporting paragraphs.

    scripts/edge-gap.py RECORDS.jsonl [HOTPOTQA.json] [--offset N]

RECORDS: `kvlink eval hotpotqa|squad --out` records (modes full / kvlink / naive, field
`index`: the question's place in the file the eval read). Records that carry
`gold_docs` and `documents` (written since 2026-12-07, SQuAD's too) need nothing else;
for older HotpotQA records, HOTPOTQA: the official dev file with `supporting_facts`
(default: ~/.cache/kvlink/data/hotpotqa.json);
`--offset N`: the eval read that file from question N on (500 for the validation split
hqa-val.json). Prints, per group of questions, n and the EM of each mode with full -
kvlink: supporting paragraph in the first document only, the last only, both, neither
(all inside), then by each document position (a question counts at each of its
supporting paragraphs' positions).
"""
import argparse
import collections
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", help="`kvlink eval hotpotqa --out` records (JSON Lines)")
    ap.add_argument("hotpotqa", nargs="?", help="dev file with supporting_facts",
                    default=os.path.expanduser("~/.cache/kvlink/data/hotpotqa.json"))
    ap.add_argument("--offset", type=int, default=0,
                    help="the eval read HOTPOTQA from this question on (500: hqa-val.json)")
    a = ap.parse_args()
    offset, data = a.offset, a.hotpotqa
    args = [a.records]
    scores = collections.defaultdict(dict)
    where = {}  # question -> (0-based gold positions, documents), from the records
    for line in open(args[0]):
        r = json.loads(line)
        scores[r["index"]][r["mode"]] = r["score"]
        if r.get("gold_docs") and r.get("documents"):
            where[r["index"]] = ([d - 1 for d in r["gold_docs"]], r["documents"])
    modes = [m for m in ("full", "kvlink", "naive") if any(m in s for s in scores.values())]
    groups = collections.defaultdict(list)
    if len(where) < len(scores):
        questions = json.load(open(data))
        if max(scores, default=-1) + offset >= len(questions):
            sys.exit(f"edge-gap: the records name question {max(scores)} (+ offset {offset}) "
                     f"but {data} holds {len(questions)}")
        for i in scores.keys() - where.keys():
            rec = questions[offset + i]
            titles = [c[0] for c in rec["context"]]
            pos = sorted({titles.index(t) for t, _ in rec["supporting_facts"] if t in titles})
            where[i] = (pos, len(titles))
    for i in sorted(scores):
        pos, n_docs = where[i]
        first, last = 0 in pos, n_docs - 1 in pos
        edge = {(True, False): "first", (False, True): "last", (True, True): "first+last"}
        groups[edge.get((first, last), "inside")].append(i)
        for p in pos:
            groups[f"doc {p + 1}"].append(i)
    print(f"{'group':>10} {'n':>4} " + " ".join(f"{m:>7}" for m in modes) + "  full-kvlink")
    order = ["first", "last", "first+last", "inside"] + [f"doc {k}" for k in range(1, 41)]
    for g in order:
        ids = groups.get(g)
        if not ids:
            continue
        em = {m: sum(scores[i].get(m, 0.0) for i in ids) / len(ids) for m in modes}
        gap = f"{em['full'] - em['kvlink']:+.3f}" if {"full", "kvlink"} <= em.keys() else ""
        print(f"{g:>10} {len(ids):>4} " + " ".join(f"{em[m]:7.3f}" for m in modes) + f"  {gap:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
