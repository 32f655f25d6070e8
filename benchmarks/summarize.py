"""Ratio table from a pytest-benchmark JSON: for each benchmark group, every provider's median
time and its speed relative to the others (median-based; ratios > 1 mean faster).

A provider is read from ``extra_info["provider"]``, else from a ``provider`` parameter.

    python benchmarks/summarize.py benchmarks/results/block_ops.json [--base slimkern] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench.get("extra_info", {}).get("provider") or (bench.get("params") or {}).get("provider")
        if provider is None:
            continue
        groups[bench.get("group") or bench["name"]][provider] = bench["stats"]["median"]
    return data.get("machine_info", {}), groups


def table(groups, base=None):
    providers = []
    for medians in groups.values():
        for p in medians:
            if p not in providers:
                providers.append(p)
    base = base or providers[0]
    others = [p for p in providers if p != base]
    header = ["group"] + [f"{p} ms" for p in providers] + [f"{base} vs {p}" for p in others]
    rows = []
    for group, medians in groups.items():
        row = [group] + [f"{medians[p] * 1e3:.2f}" if p in medians else "-" for p in providers]
        for p in others:
            ok = p in medians and base in medians
            row.append(f"{medians[p] / medians[base]:.2f}x" if ok else "-")
        rows.append(row)
    return header, rows


def render(header, rows, markdown=False):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--base", help="provider the others are compared with (default: the first seen)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    machine, groups = load(args.json)
    if not groups:
        print("no benchmarks with a provider in", args.json, file=sys.stderr)
        return 1
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    print(f"# {args.json}: {cpu}, medians; 'A vs B' = time(B) / time(A), > 1 means A is faster")
    print(render(*table(groups, args.base), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
