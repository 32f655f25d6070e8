"""ParaDiS Appendix F at CPU scale: more switches, and switches for free.

Three ParaDiS ResNets (a CIFAR ResNet with one basic block per stage, 16/32/64 channels at
1.0x before ``width_mult``; 8x8 digits) are trained with the same recipe, for every seed:

* **4 switches** (the paper's main model): ``[1.2], [1.0], [0.5,0.5], [4x0.25]``;
* **F.1, 5 switches**: the same plus ``[8x0.125]``;
* **F.2, 8 switches** that vary the *spanned* width (the total width a switch covers):
  ``[1.2], [1.0], [0.5,0.5], [4x0.25]`` plus ``[0.75], [0.375,0.375], [0.5], [0.25,0.25]``
  (our reading of F.2: the added switches span 0.75x and 0.5x of the net instead of 1.0x).

Each is then evaluated (BN statistics calibrated per switch) on every trained switch of any
variant and on the six **untrained** switches of F.1, which tile the full width with branch
widths the net has been trained on: ``[0.5,0.25,0.25], [0.5,0.25,0.125,0.125], [0.5,0.125x4],
[0.25,0.25,0.25,0.125,0.125], [0.25,0.25,0.125x4], [0.25,0.125x6]``.

``python -m slimkern.scaling --out runs/scaling`` (or ``slimkern scaling``) writes
``results.csv`` (one row per variant, seed, switch), ``summary.csv`` (top-1 mean ± std over
seeds), ``report.json`` and ``scaling.png``, updated after every run.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from slimkern.report import save_figure
from slimkern.runfolder import add_options as _add
from slimkern.runfolder import experiment_main, start, summarize, write_csv, write_json

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
    "seeds": [0, 1, 2], "variants": list(VARIANTS), "blocks": 1, "width_mult": 0.5, "image_size": 8,
    "epochs": 12, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1.0, "threads": 1, "out": "runs/scaling",
}


def eval_switches() -> list[str]:
    """Every switch any variant trains, then the F.1 free switches (deduplicated, in order)."""
    sws = [s for v in VARIANTS.values() for s in v] + FREE_F1
    return list(dict.fromkeys(sws))


def train_eval(cfg: dict, variant: str, seed: int) -> list[dict]:
    """Trains ``variant`` with ParaDiS (wide KD, beta = 1) for one seed, calibrates BN for every
    evaluation switch and returns one row per switch (top-1 on the held-out digits)."""
    import torch
    from torch.utils.data import DataLoader

    import slimkern
    from slimkern.data import digits
    from slimkern.models.resnet import CifarResNet
    from slimkern.train import ParaDiSTrainer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    split = digits(image_size=cfg["image_size"], channels=3, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CifarResNet([16, 32, 64], [cfg["blocks"]] * 3, split.num_classes, 3, max_width=1.2,
                          width_mult=cfg["width_mult"])
    t0 = time.perf_counter()
    tr = ParaDiSTrainer(net, VARIANTS[variant], beta=1.0, kd="wide", lr=cfg["lr"], schedule="cosine",
                        warmup_epochs=cfg["warmup_epochs"], seed=seed, progress=False)
    tr.fit(split.train, cfg["epochs"], batch_size=cfg["batch_size"])
    secs = time.perf_counter() - t0
    sws = [slimkern.Switch.parse(s) for s in eval_switches()]
    calib = DataLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                       generator=torch.Generator().manual_seed(seed + 7))
    slimkern.calibrate_bn(net, calib, sws, num_batches=20)
    test = DataLoader(split.test, batch_size=256, shuffle=False)
    rep = slimkern.evaluate(net, test, sws, trained=tr.trained_switches(), input_size=split.input_size,
                            progress=False)
    return [{"variant": variant, "seed": seed, "switch": r.switch, "trained": bool(r.trained), "top1": r.top1,
             "macs": r.macs, "max_device_macs": r.max_device_macs, "branches": r.branches,
             "train_seconds": round(secs, 1)} for r in rep.results]


def short(sw: str) -> str:
    """The paper's compact notation: ``"[0.25, 0.125, 0.125]x"`` -> ``"[0.25, 2x0.125]"``."""
    parts = [p.strip() for p in sw.strip("[]x").split(",")]
    out, i = [], 0
    while i < len(parts):
        j = i
        while j < len(parts) and parts[j] == parts[i]:
            j += 1
        out.append(parts[i] if j - i == 1 else f"{j - i}x{parts[i]}")
        i = j
    return "[" + ", ".join(out) + "]"


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
    ax.set_xticklabels([short(s) for s in sws], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("top-1 on digits (%), mean ± std over seeds")
    ax.set_title("ParaDiS scaling (Appendix F): filled = trained switch, hollow = free (untrained)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def run(cfg: dict) -> dict:
    for v in {**DEFAULTS, **cfg}["variants"]:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    cfg, out = start(cfg, DEFAULTS, "scaling")
    t0 = time.perf_counter()
    rows, report = [], {}
    for seed in cfg["seeds"]:
        for v in cfg["variants"]:
            rs = train_eval(cfg, v, seed)
            rows += rs
            log.info("%s seed %d: %s", v, seed, {r["switch"]: round(100 * r["top1"], 2) for r in rs})
            report = _write(cfg, out, rows, time.perf_counter() - t0)  # complete after every run
    return report


def _write(cfg: dict, out: str, rows: list[dict], seconds: float) -> dict:
    write_csv(os.path.join(out, "results.csv"), rows)
    summary = summarize(rows, ["variant", "switch"], "top1", carry=["trained", "macs", "max_device_macs", "branches"])
    write_csv(os.path.join(out, "summary.csv"), summary)
    report = {"experiment": "ParaDiS Appendix F (scaling) on digits", "config": cfg, "variants": VARIANTS,
              "free_switches_f1": FREE_F1, "seconds": round(seconds, 1), "summary": summary, "rows": rows}
    write_json(os.path.join(out, "report.json"), report)
    plot(summary, os.path.join(out, "scaling.png"))
    return report


def table(summary: list[dict]) -> str:
    """Markdown: one row per switch, one column per variant (top-1 %, mean ± std; * = untrained);
    MACs per 8x8 image in thousands."""
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    sws = list(dict.fromkeys(s["switch"] for s in summary))
    cell = {(s["variant"], s["switch"]): s for s in summary}
    lines = ["| switch | kMAC (total / busiest device) | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for sw in sws:
        any_ = next(cell[(v, sw)] for v in variants if (v, sw) in cell)
        vals = []
        for v in variants:
            c = cell.get((v, sw))
            vals.append("" if c is None else f"{100 * c['top1_mean']:.2f} ± {100 * c['top1_std']:.2f}"
                        + ("" if c["trained"] else " *"))
        lines.append(f"| {sw} | {any_['macs'] / 1e3:.1f} / {any_['max_device_macs'] / 1e3:.1f} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser) -> None:
    _add(p, DEFAULTS, {"seeds": int})


def main(argv=None) -> int:
    return experiment_main("python -m slimkern.scaling", __doc__, add_options, run,
                           lambda rep: table(rep["summary"]), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
