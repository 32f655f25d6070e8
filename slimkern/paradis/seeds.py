"""One configured run repeated over seeds, summarised per switch as mean ± sample std.

``slimkern demo paradis --seeds 0,1,2,3,4`` (or ``slimkern train --seeds ...``) runs
:func:`slimkern.runner.run` once per seed into ``<out>/seed<k>/`` and writes
``<out>/summary.json`` and ``<out>/summary.csv``: for every (switch, model kind) the per-seed
top-1, its mean and its sample standard deviation (``n - 1`` in the denominator; 0 for one seed).
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics

from slimkern.report import atomic_write_text

SUMMARY_FIELDS = ("switch", "kind", "trained", "macs", "max_device_macs", "params", "top1_mean", "top1_std",
                  "top1_min", "seeds", "top1_per_seed")


def parse_seeds(values) -> list[int]:
    """``["0,1,2"]``, ``["0", "1"]``, ``"0,1"`` or ``[0, 1]`` -> ``[0, 1, 2]``; duplicates are an error."""
    if isinstance(values, (str, int)):
        values = [values]
    seeds: list[int] = []
    for v in values:
        for part in str(v).replace(" ", "").split(","):
            if not part:
                continue
            try:
                seeds.append(int(part))
            except ValueError:
                raise ValueError(f"--seeds takes integers like 0,1,2; got {part!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has duplicates: {seeds}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be >= 0, got {seeds}")
    return seeds


def summarize(reports: dict) -> list[dict]:
    """``{seed: Report}`` -> one row per (switch, kind) present in every report, in the first
    report's order: top-1 mean, sample std, min and the per-seed values (fractions in [0, 1])."""
    if not reports:
        raise ValueError("summarize: no reports")
    seeds = sorted(reports)
    first = reports[seeds[0]]
    rows = []
    for r in first.results:
        vals = []
        for s in seeds:
            try:
                vals.append(reports[s][r.switch, r.kind].top1)
            except KeyError:
                break
        if len(vals) != len(seeds):
            continue
        rows.append({"switch": r.switch, "kind": r.kind, "trained": r.trained, "macs": r.macs,
                     "max_device_macs": r.max_device_macs, "params": r.params,
                     "top1_mean": statistics.fmean(vals), "top1_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "top1_min": min(vals), "seeds": seeds, "top1_per_seed": vals})
    return rows


def write_summary(rows: list[dict], out: str, meta: dict) -> None:
    """``summary.json`` (rows + meta) and ``summary.csv``, written atomically."""
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({**row, "seeds": " ".join(map(str, row["seeds"])),
                    "top1_per_seed": " ".join(f"{v:.4f}" for v in row["top1_per_seed"])})
    atomic_write_text(os.path.join(out, "summary.csv"), buf.getvalue())


def summary_table(rows: list[dict], title: str):
    """A ``rich`` table: switch, model, top-1 mean ± std (%), worst seed, MMAC, trained."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, caption="top-1 over seeds: mean ± sample std; min: the worst seed")
    for col in ("switch", "model", "top1 % (mean ± std)", "min %", "MMAC", "MMAC/dev", "trained"):
        t.add_column(col, justify="left" if col in ("switch", "model") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["switch"], "indiv." if r["kind"] == "individual" else r["kind"],
                  f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}", f"{100 * r['top1_min']:.2f}",
                  f"{r['macs'] / 1e6:.2f}", f"{r['max_device_macs'] / 1e6:.2f}",
                  {True: "yes", False: "no", None: "?"}[r["trained"]])
    return t


def run_seeds(cfg: dict, seeds, console=None, title: str | None = None) -> list[dict]:
    """:func:`slimkern.runner.run` for each seed into ``<out>/seed<k>``; returns the summary rows."""
    from slimkern import runner

    seeds = parse_seeds(seeds)
    if not seeds:
        raise ValueError("run_seeds: give at least one seed")
    out = os.path.abspath(cfg["out"])
    reports = {}
    for s in seeds:
        reports[s] = runner.run({**cfg, "seed": s, "seeds": [], "out": os.path.join(out, f"seed{s}")},
                                console=None, title=title)
        if console is not None:
            console.print(f"seed {s}: " + ", ".join(f"{r.switch}{'' if r.kind == 'shared' else ' indiv.'} "
                                                     f"{100 * r.top1:.2f}" for r in reports[s].results))
    rows = summarize(reports)
    write_summary(rows, out, {"title": title, "seeds": seeds, "config": {k: v for k, v in cfg.items() if k != "seeds"}})
    if console is not None:
        console.print(summary_table(rows, f"{title or 'slimkern'}: {len(seeds)} seeds"))
    return rows
