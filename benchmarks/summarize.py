"""Ratio table from pytest-benchmark JSONs: for each benchmark group, every provider's median
time and its speed relative to the others (median-based; ratios > 1 mean faster).

A provider is read from ``extra_info["provider"]``, else from a ``provider`` parameter. With
several files, a group found in a later file replaces the earlier one as a whole (a re-run of
a noisy group), so every ratio still compares providers timed in one run.

    python benchmarks/summarize.py benchmarks/results/block_ops.json [more.json] [--base slimkern]
        [--markdown] [--targets]
    python benchmarks/summarize.py benchmarks/results/switchable_bn.json --bn

--targets checks the CPU targets of the block ops (issue 2) on groups whose extra_info names
``mode``, ``kind`` and ``G``: forward at G = 1 at least 0.9x the dense limit; forward+backward
at G >= 2 on 1x1 and depthwise shapes at least 1.3x the naive path; nothing below 0.9x naive.

--bn prints the switchable_batch_norm table instead: one row per (shape, table) of
``extra_info``, slimkern_cpp vs torch_per_block by medians and by minima, then the lowest
median ratio and the geometric mean of the median ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict


def load(path):
    """(machine_info, {group: {provider: stats}}, {group: extra_info of its first benchmark});
    stats is pytest-benchmark's dict (median, min, ...)."""
    with open(path) as f:
        data = json.load(f)
    groups, info = defaultdict(dict), {}
    for bench in data["benchmarks"]:
        provider = bench.get("extra_info", {}).get("provider") or (bench.get("params") or {}).get("provider")
        if provider is None:
            continue
        group = bench.get("group") or bench["name"]
        groups[group][provider] = bench["stats"]
        info.setdefault(group, bench.get("extra_info", {}))
    return data.get("machine_info", {}), groups, info


def load_all(paths):
    machine, groups, info = {}, {}, {}
    for path in paths:
        m, g, i = load(path)
        machine = machine or m
        with open(path) as f:
            timer = (json.load(f).get("benchmarks") or [{}])[0].get("options", {}).get("timer", "?")
        print(f"# {path}: timer {timer}")
        groups.update(g)
        info.update(i)
    return machine, groups, info


TARGETS = (  # (name, applies(extra_info), provider compared with, minimum time(other)/time(slimkern))
    ("fwd G=1 vs dense >= 0.9x", lambda e: e.get("mode") == "fwd" and e.get("G") == 1, "dense", 0.9),
    ("fwd+bwd G>=2 1x1/dw vs naive >= 1.3x",
     lambda e: e.get("mode") == "fwdbwd" and (e.get("G") or 0) >= 2 and e.get("kind") in ("1x1", "dw3x3"),
     "naive", 1.3),
    ("every case vs naive >= 0.9x", lambda e: "mode" in e, "naive", 0.9),
)


def check_targets(groups, info, base="slimkern"):
    """Lines of a target report; returns (lines, number of failures)."""
    lines, failures = [], 0
    for name, applies, other, minimum in TARGETS:
        rows = [(g, m[other] / m[base]) for g, m in groups.items()
                if applies(info.get(g, {})) and other in m and base in m]
        if not rows:
            continue
        bad = [(g, r) for g, r in rows if r < minimum]
        failures += len(bad)
        worst = min(rows, key=lambda gr: gr[1])
        lines.append(f"{'FAIL' if bad else 'ok  '} {name}: {len(rows) - len(bad)}/{len(rows)} hold; "
                     f"min {worst[1]:.2f}x ({worst[0]})")
        lines += [f"       below: {g} {r:.2f}x" for g, r in bad]
    return lines, failures


def medians(groups):
    return {g: {p: stats["median"] for p, stats in by_provider.items()} for g, by_provider in groups.items()}


def bn_table(groups, info, base="slimkern_cpp", other="torch_per_block"):
    """Lines of the switchable_batch_norm table (bench_switchable_bn.py): median and min ratios."""
    lines = [f"{'shape':15s} {'table':22s} {'slimkern med':>12s} {'per-block med':>13s} {'ratio med':>9s} "
             f"{'ratio min':>9s}"]
    meds = []
    for group, p in groups.items():
        s, t = p[base], p[other]
        meds.append(t["median"] / s["median"])
        lines.append(f"{info[group]['shape']:15s} {info[group]['table']:22s} {s['median'] * 1e3:10.3f}ms "
                     f"{t['median'] * 1e3:11.3f}ms {t['median'] / s['median']:8.2f}x {t['min'] / s['min']:8.2f}x")
    lines.append(f"lowest median ratio {min(meds):.2f}x, geometric mean {math.prod(meds) ** (1 / len(meds)):.2f}x")
    return lines


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
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files; later ones replace groups")
    ap.add_argument("--base", help="provider the others are compared with (default: the first seen)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--targets", action="store_true", help="check the block-op CPU targets (exit 2 on a miss)")
    ap.add_argument("--bn", action="store_true", help="the switchable_batch_norm table (median and min ratios)")
    args = ap.parse_args(argv)
    machine, stats, info = load_all(args.json)
    if not stats:
        print("no benchmarks with a provider in", args.json, file=sys.stderr)
        return 1
    if args.bn:
        print("\n".join(bn_table(stats, info)))
        return 0
    groups = medians(stats)
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    cap = machine.get("slimkern_cpu_capability") or {}
    if cap:
        cpu += f" (slimkern CPU kernels: {cap.get('in_use')}, processor {cap.get('hardware')})"
    print(f"# {', '.join(args.json)}: {cpu}, medians; 'A vs B' = time(B) / time(A), > 1 means A is faster")
    print(render(*table(groups, args.base), markdown=args.markdown))
    if args.targets:
        lines, failures = check_targets(groups, info, args.base or "slimkern")
        print("\n".join(["", "# targets (median ratios, time(other) / time(slimkern))"] + lines))
        return 2 if failures else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
