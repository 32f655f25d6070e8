"""ParaDiS Appendix F at CPU scale: more switches, and switches for free.

Three ParaDiS ResNets are trained on digits with the same recipe, for every seed:

* **4 switches** (the paper's main model): ``[1.2], [1.0], [0.5,0.5], [4x0.25]``;
* **F.1, 5 switches**: the same plus ``[8x0.125]``;
* **F.2, 8 switches** that vary the *spanned* width (the total width a switch covers):
  ``[1.2], [1.0], [0.5,0.5], [4x0.25]`` plus ``[0.75], [0.375,0.375], [0.5], [0.25,0.25]``
  (our reading of F.2: the added switches span 0.75x and 0.5x of the net instead of 1.0x).

Each is then evaluated (BN statistics calibrated per switch) on every trained switch of any
variant and on the six **untrained** switches of F.1, which tile the full width with branch
widths the net has been trained on: ``[0.5,0.25,0.25], [0.5,0.25,0.125,0.125], [0.5,0.125x4],
[0.25,0.25,0.25,0.125,0.125], [0.25,0.25,0.125x4], [0.25,0.125x6]``.

``python -m slimkern.scaling --out runs/scaling`` (or ``slimkern scaling``): per variant and
seed a ``slimkern train`` run folder (``<out>/<variant>/seed<k>/``), plus ``results.csv``,
``summary.csv`` (top-1 mean ± std over seeds), ``report.json`` and ``scaling.png``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from slimkern.runfolder import summarize, write_csv, write_json

log = logging.getLogger("slimkern.scaling")

BASE4 = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
VARIANTS = {
    "4-switch": BASE4,
    "F.1 5-switch": BASE4 + ["[8x0.125]x"],
    "F.2 8-switch": BASE4 + ["[0.75]x", "[0.375, 0.375]x", "[0.5]x", "[0.25, 0.25]x"],
}
FREE_F1 = ["[0.5, 0.25, 0.25]x", "[0.5, 0.25, 0.125, 0.125]x", "[0.5, 4x0.125]x",
           "[0.25, 0.25, 0.25, 0.125, 0.125]x", "[0.25, 0.25, 4x0.125]x", "[0.25, 6x0.125]x"]

DEFAULTS: dict = {
    "seeds": [0, 1, 2], "variants": list(VARIANTS), "model": "resnet20", "width_mult": 0.5, "image_size": 8,
    "epochs": 8, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1.0, "threads": 1, "out": "runs/scaling",
}


def eval_switches() -> list[str]:
    """Every switch any variant trains, then the F.1 free switches (deduplicated, in order)."""
    sws = [s for v in VARIANTS.values() for s in v] + FREE_F1
    return list(dict.fromkeys(sws))


def run_config(cfg: dict, variant: str, seed: int) -> dict:
    """The ``slimkern train`` configuration of one variant and seed."""
    from slimkern.runner import DEFAULTS as RUN_DEFAULTS

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    trained = VARIANTS[variant]
    return {**RUN_DEFAULTS, "dataset": "digits", "image_size": cfg["image_size"], "channels": 3,
            "model": cfg["model"], "width_mult": cfg["width_mult"], "max_width": 1.2, "recipe": "paradis",
            "switches": trained, "eval_switches": [s for s in eval_switches() if s not in trained],
            "kd": "wide", "beta": 1.0, "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
            "warmup_epochs": cfg["warmup_epochs"], "weight_decay": 5e-4, "schedule": "cosine", "seed": seed,
            "threads": cfg["threads"], "calibrate_batches": 20, "progress": False,
            "out": os.path.join(cfg["out"], variant.replace(" ", "_").replace(".", ""), f"seed{seed}")}


def plot(summary: list[dict], path: str) -> None:
    """Top-1 per evaluated switch (x) for each variant (one marker series each); untrained
    switches drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sws = list(dict.fromkeys(s["switch"] for s in summary))
    fig, ax = plt.subplots(figsize=(10, 5))
    for k, v in enumerate(dict.fromkeys(s["variant"] for s in summary)):
        for s in (r for r in summary if r["variant"] == v):
            x = sws.index(s["switch"]) + (k - 1) * 0.22
            ax.errorbar(x, 100 * s["top1_mean"], yerr=100 * s["top1_std"], marker="os^"[k % 3], color=f"C{k}",
                        mfc=f"C{k}" if s["trained"] else "white", capsize=2, linestyle="none",
                        label=v if s["switch"] == sws[0] else None)
    ax.set_xticks(range(len(sws)))
    ax.set_xticklabels([s.replace(", ", ",") for s in sws], rotation=55, ha="right", fontsize=7)
    ax.set_ylabel("top-1 on digits (%), mean ± std over seeds")
    ax.set_title("ParaDiS scaling (Appendix F): filled = trained switch, hollow = free (untrained)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def run(cfg: dict) -> dict:
    from slimkern import runner

    cfg = {**DEFAULTS, **cfg}
    for v in cfg["variants"]:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    if not cfg["seeds"]:
        raise ValueError("scaling: give at least one seed")
    out = os.path.abspath(cfg["out"])
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for seed in cfg["seeds"]:
        for v in cfg["variants"]:
            rep = runner.run(run_config({**cfg, "out": out}, v, seed))
            for r in rep.results:
                rows.append({"variant": v, "seed": seed, "switch": r.switch, "trained": bool(r.trained),
                             "top1": r.top1, "macs": r.macs, "max_device_macs": r.max_device_macs,
                             "branches": r.branches, "train_seconds": rep.meta.get("train_seconds")})
            log.info("%s seed %d: %s", v, seed, {r.switch: round(100 * r.top1, 2) for r in rep.results})
            write_csv(os.path.join(out, "results.csv"), rows)
    summary = summarize(rows, ["variant", "switch"], "top1", carry=["trained", "macs", "max_device_macs", "branches"])
    write_csv(os.path.join(out, "summary.csv"), summary)
    report = {"experiment": "ParaDiS Appendix F (scaling) on digits", "config": cfg, "variants": VARIANTS,
              "free_switches_f1": FREE_F1, "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
              "rows": rows}
    write_json(os.path.join(out, "report.json"), report)
    plot(summary, os.path.join(out, "scaling.png"))
    return report


def table(summary: list[dict]) -> str:
    """Markdown: one row per switch, one column per variant (top-1 %, mean ± std; * = untrained)."""
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    sws = list(dict.fromkeys(s["switch"] for s in summary))
    cell = {(s["variant"], s["switch"]): s for s in summary}
    lines = ["| switch | MMAC (total / max device) | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for sw in sws:
        any_ = next(cell[(v, sw)] for v in variants if (v, sw) in cell)
        vals = []
        for v in variants:
            c = cell.get((v, sw))
            vals.append("" if c is None else f"{100 * c['top1_mean']:.2f} ± {100 * c['top1_std']:.2f}"
                        + ("" if c["trained"] else " *"))
        lines.append(f"| {sw} | {any_['macs'] / 1e6:.2f} / {any_['max_device_macs'] / 1e6:.2f} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser) -> None:
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, list):
            p.add_argument(flag, nargs="+", type=int if k == "seeds" else str, default=v)
        else:
            p.add_argument(flag, type=type(v), default=v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimkern.scaling", description=__doc__.split("\n\n")[0])
    add_options(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rep = run(vars(args))
    print(table(rep["summary"]))
    print(f"run folder: {os.path.abspath(args.out)} ({rep['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
