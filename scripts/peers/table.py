#!/usr/bin/env python3
"""One table from the engines' benchmark outputs (scripts/gpu-peers.sh writes them).

    scripts/peers/table.py FILE... > table.md

Each FILE holds JSON lines. A line is either a peer result
({"engine", "shape", "measure", "value", "unit", ...}: scripts/peers/hf_bench.py,
scripts/peers/llama-cpp-bench.sh) or a `kvlink bench speed --json` / `kvlink bench ttft
--json` object with a "shape" key added (gpu-peers.sh adds it), turned here into kvlink
rows with the peers' measure names. Prints a markdown table: one row per shape and
measure, one column per engine, and kvlink's advantage over each peer (for tok/s
kvlink / peer, for ms peer / kvlink: above 1 means kvlink is faster).
"""
import json
import re
import sys


def kvlink_rows(obj):
    """Rows of one `kvlink bench speed|ttft --json` object."""
    shape = obj.get("shape", "?")
    out = []
    for r in obj.get("results", []):  # bench speed
        m = r.get("measure", "")
        if (g := re.fullmatch(r"prefill (\d+) tokens", m)):
            out.append((shape, f"prefill {g[1]}", r["tok_s"], "tok/s"))
        elif (g := re.fullmatch(r"decode (\d+) tokens after (\d+)", m)):
            out.append((shape, f"decode {g[1]} after {g[2]}", r["tok_s"], "tok/s"))
    if "full_ms" in obj:  # bench ttft
        tag = f"{obj['docs']} x {obj['doc_len']} + {obj['question_len']}"
        out.append((shape, f"ttft full {tag}", obj["full_ms"], "ms"))
        out.append((shape, f"ttft reuse {tag}", obj["kvlink_gpu_ms"], "ms"))
    return [{"engine": "kvlink", "shape": s, "measure": m, "value": v, "unit": u}
            for s, m, v, u in out]


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) > 1 else 2
    rows = []
    for path in sys.argv[1:]:
        for n, line in enumerate(open(path), 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                sys.exit(f"table: {path}:{n}: not JSON: {e}")
            rows.extend([obj] if "engine" in obj else kvlink_rows(obj))
    rows = [r for r in rows if r.get("unit") in ("tok/s", "ms")]
    engines = ["kvlink"] + sorted({r["engine"] for r in rows} - {"kvlink"})
    cell = {(r["shape"], r["measure"], r["engine"]): (r["value"], r["unit"]) for r in rows}
    keys = []
    for r in rows:
        if (r["shape"], r["measure"]) not in keys:
            keys.append((r["shape"], r["measure"]))
    peers = engines[1:]
    print("| shape | measure | " + " | ".join(engines) + " | "
          + " | ".join(f"kvlink vs {p}" for p in peers) + " |")
    print("|---|---|" + "---:|" * (len(engines) + len(peers)))
    for shape, measure in sorted(keys, key=lambda k: (k[0], k[1])):
        vals = [cell.get((shape, measure, e)) for e in engines]
        unit = next(v[1] for v in vals if v)
        fmt = (lambda v: f"{v:,.0f}") if unit == "tok/s" else (lambda v: f"{v:.2f} ms")
        shown = [fmt(v[0]) if v else "" for v in vals]
        ratios = []
        for v in vals[1:]:
            if v and vals[0] and v[0] > 0 and vals[0][0] > 0:
                k = vals[0][0] / v[0] if unit == "tok/s" else v[0] / vals[0][0]
                ratios.append(f"{k:.2f}x")
            else:
                ratios.append("")
        label = f"{measure} ({unit})" if unit == "tok/s" else measure
        print(f"| {shape} | {label} | " + " | ".join(shown) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
