"""``slimkern paradis baselines|ablation|figure4``: the ParaDiS paper's comparisons on digits.

    slimkern paradis baselines --seeds 0,1,2 --epochs 5 --out runs/paradis-baselines   # Tables 3-5
    slimkern paradis ablation  --seeds 0,1,2 --epochs 5 --out runs/paradis-ablation    # Table 1
    slimkern paradis figure4   --seeds 0,1,2 --epochs 5 --out runs/paradis-figure4     # Figure 4, right

Each trains the jobs it needs (:mod:`slimkern.paradis.jobs`; results cached in ``--cache``, so
jobs shared by the commands train once) and writes its run folder: ``report.json`` (the table
with per-seed values), ``table.csv``, ``table.md`` and ``plot.png``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os

from slimkern.paradis.jobs import JOBS, SMALL, UNTRAINED
from slimkern.report import atomic_write_text

WHAT = {
    "baselines": ["paradis", "us", "us-wide", "slimmable", "indiv-1.0", "indiv-0.5,0.5", "indiv-4x0.25"],
    "ablation": ["paradis-nokd", "paradis-ipkd", "paradis-wide-ipkd", "paradis-b0.1", "paradis"],
    "figure4": ["paradis", "us", "indiv-1.0", "indiv-0.5,0.5", "indiv-4x0.25"],
}


def add_paradis_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("paradis", help="the ParaDiS paper's baselines (Tables 3-5), ablation (Table 1) and "
                                       "Figure 4 on digits, several seeds")
    p.add_argument("what", choices=list(WHAT), help="baselines: US-Nets / fixed-width slimmable / individual "
                   "models vs ParaDiS; ablation: KD variants; figure4: accuracy vs MACs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of every job (default 5)")
    p.add_argument("--out", default=None, help="run folder (default runs/paradis-<what>)")
    p.add_argument("--cache", default="runs/paradis-jobs", help="folder of cached job results (shared by the commands)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--cached-only", action="store_true", help="train nothing: report the jobs already in --cache "
                   "for every seed (the others are listed as missing in report.json)")
    return p


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _flat(prefix: str, st: dict | None) -> dict:
    if st is None:
        return {f"{prefix}_mean": "", f"{prefix}_std": "", f"{prefix}_per_seed": ""}
    return {f"{prefix}_mean": round(st["mean"], 3), f"{prefix}_std": round(st["std"], 3),
            f"{prefix}_per_seed": " ".join(f"{v:.2f}" for v in st["per_seed"])}


def run(what: str, seeds: list[int], epochs: int, out: str, cache: str, echo=print, cached_only: bool = False) -> dict:
    """Train (or reuse) the jobs of ``what`` and write its run folder; returns the report dict."""
    from slimkern.paradis import plots, tables
    from slimkern.paradis.jobs import run_jobs

    if what not in WHAT:
        raise ValueError(f"unknown experiment {what!r}; choose one of {list(WHAT)}")
    os.makedirs(out, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    res = run_jobs(WHAT[what], seeds, epochs, cache, echo=echo, cached_only=cached_only)
    if "paradis" not in res:
        raise ValueError(f"no cached 'paradis' job for seeds {seeds} at {epochs} epochs in {cache}")
    meta = {"experiment": what, "seeds": seeds, "epochs": epochs, "jobs": WHAT[what],
            "setting": "MobileNet-v1 (CIFAR variant, width_mult 0.5) on digits 8x8x3; SGD Nesterov lr 0.1, "
                       "cosine, batch 32, 1 warm-up epoch, clip 5; top-1 in %, mean ± sample std over seeds",
            "missing_jobs": [j for j in WHAT[what] if j not in res]}
    if what == "baselines":
        rows = tables.baselines_table(res)
        md = tables.baselines_markdown(rows)
        flat = [{"paradis_switch": r["paradis_switch"], "trained": r["trained"], "macs": r["macs"],
                 "max_device_macs": r["max_device_macs"], **_flat("paradis", r["paradis"]), "us_switch": r["us_switch"],
                 **_flat("us", r["us"]), **_flat("us_wide", r["us_wide"]), "slimmable_switch": r.get("slimmable_switch"),
                 **_flat("slimmable", r.get("slimmable")), **_flat("individual", r["individual"])} for r in rows]
        groups = [r["paradis_switch"].replace("0.25, 0.25, 0.25, 0.25", "4x0.25") for r in rows]
        plots.grouped_bars(groups, [("ParaDiS", [r["paradis"] for r in rows]),
                                    ("US IPKD (closest MACs)", [r["us"] for r in rows]),
                                    ("US Wide IPKD (closest MACs)", [r["us_wide"] for r in rows]),
                                    ("slimmable (closest MACs)", [r.get("slimmable") for r in rows]),
                                    ("individual", [r["individual"] for r in rows])],
                           os.path.join(out, "plot.png"), f"ParaDiS vs baselines on digits ({len(seeds)} seeds, "
                           f"{epochs} epochs)", "top-1 accuracy (%)")
    elif what == "ablation":
        rows = tables.ablation_table(res)
        md = tables.ablation_markdown(rows)
        flat = [{"variant": r["variant"], "job": r["job"], **{k: v for sw in SMALL + UNTRAINED
                                                                for k, v in _flat(sw, r[sw]).items()}} for r in rows]
        plots.grouped_bars([s.replace("0.25, 0.25, 0.25, 0.25", "4x0.25") for s in SMALL + UNTRAINED],
                           [(r["variant"], [r[sw] for sw in SMALL + UNTRAINED]) for r in rows],
                           os.path.join(out, "plot.png"), f"ParaDiS ablation (Table 1) on digits ({len(seeds)} seeds, "
                           f"{epochs} epochs)", "top-1 accuracy (%)")
    else:
        pts = tables.figure4_points(res)
        rows = [{"series": k, **st} for k, v in pts.items() for st in v]
        flat = [{**{k: v for k, v in r.items() if k != "per_seed"}, "per_seed": " ".join(f"{v:.2f}" for v in r["per_seed"])}
                for r in rows]
        md = "| series | switch | MACs | MACs/device | top-1 % | trained |\n|---|---|---|---|---|---|\n" + "".join(
            f"| {r['series']} | {r['switch']} | {r['macs'] / 1e6:.2f}M | {r['max_device_macs'] / 1e6:.2f}M "
            f"| {r['mean']:.2f} ± {r['std']:.2f} | {'yes' if r['trained'] else 'no'} |\n" for r in rows)
        plots.figure4(pts, os.path.join(out, "plot.png"), f"ParaDiS on digits, Figure 4 (right) analogue "
                      f"({len(seeds)} seeds, {epochs} epochs)")
    report = {"meta": meta, "rows": rows}
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(os.path.join(out, "table.csv"), _csv(flat, list(flat[0])))
    atomic_write_text(os.path.join(out, "table.md"), md)
    echo(md)
    return report


def cmd_paradis(args) -> int:
    import torch

    from slimkern.paradis.seeds import parse_seeds

    seeds = parse_seeds(args.seeds)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/paradis-{args.what}"
    run(args.what, seeds, args.epochs, os.path.abspath(out), os.path.abspath(args.cache), cached_only=args.cached_only)
    print(f"run folder: {os.path.abspath(out)}")
    return 0


assert all(j in JOBS for jobs in WHAT.values() for j in jobs)
