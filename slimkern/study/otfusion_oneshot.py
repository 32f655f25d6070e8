"""One-shot OT fusion on digits (issue 17 acceptance): two independently trained models of the
same width fused by OT vs vanilla (entry-wise) averaging, and a 0.5x and a 1.0x model fused
into a target of either width, with accuracy against both parents.

    slimkern study otfusion --seeds 0 1 2 --out runs/otfusion

Per seed: digits split ``load_digits_split(seed)``; models ``small_cnn`` with channels
``C`` (1.0x) and ``C/2`` (0.5x), initialised from different seeds and trained centrally on
the same training split (different batch orders). Fused models are scored with the BN
statistics as fused and after recalibrating them on the server split (``calibrate_bn``).
"""
from __future__ import annotations

import copy
import os
import time

import torch

from slimkern.fl.demo import load_digits_split
from slimkern.fl.models import small_cnn
from slimkern.fl.ot_fusion import ot_fuse
from slimkern.study.common import (accuracy, calibrate, fmt, makedirs, mean_std, save_figure, train_central,
                                   write_csv, write_json)

__all__ = ["run_otfusion_oneshot", "vanilla_average"]


def vanilla_average(models, weights=None):
    """Entry-wise average of same-shaped models (FedAvg of one round, no alignment)."""
    weights = weights or [1.0 / len(models)] * len(models)
    out = copy.deepcopy(models[0])
    with torch.no_grad():
        sd = out.state_dict()
        for k, v in sd.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.copy_(sum(w * m.state_dict()[k] for w, m in zip(weights, models)))
    return out


def _score(net, test, calib) -> tuple[float, float]:
    as_fused = accuracy(net, *test)
    net = copy.deepcopy(net)
    calibrate(net, calib[0])
    return as_fused, accuracy(net, *test)


def run_otfusion_oneshot(seeds=(0, 1, 2), channels=(32, 64, 12), epochs: int = 15, out: str = "runs/otfusion",
                         log=print) -> dict:
    """Runs the one-shot comparison; writes ``report.json``, ``results.csv``, ``otfusion.png``."""
    makedirs(out)
    half = tuple(max(1, c // 2) for c in channels)
    rows, t0 = [], time.perf_counter()
    for seed in seeds:
        train, calib, test = load_digits_split(seed)
        X, Y = train
        nets = {}
        for name, ch, init in (("A", channels, 100 + seed), ("B", channels, 200 + seed), ("S", half, 300 + seed)):
            net = small_cnn(10, 1, ch, seed=init)
            train_central(net, X, Y, epochs=epochs, seed=init)
            nets[name] = net
        A, B, S = nets["A"], nets["B"], nets["S"]
        data = X[:256]
        res = {"seed": seed, "parent A (1.0x)": accuracy(A, *test), "parent B (1.0x)": accuracy(B, *test),
               "parent S (0.5x)": accuracy(S, *test)}
        cands = {
            "A+B vanilla average": vanilla_average([A, B]),
            "A+B OT emd weights": ot_fuse([A, B], method="emd"),
            "A+B OT emd activations": ot_fuse([A, B], method="emd", ground="activations", data=data),
            "A+B OT sinkhorn(0.01) activations": ot_fuse([A, B], method="sinkhorn", reg=1e-2,
                                                         ground="activations", data=data),
            "S+A OT into 1.0x (weights)": ot_fuse([S, A], target=1),
            "S+A OT into 1.0x (activations)": ot_fuse([S, A], target=1, ground="activations", data=data),
            "S+A OT into 0.5x (weights)": ot_fuse([S, A], target=0),
            "S+A OT into 0.5x (activations)": ot_fuse([S, A], target=0, ground="activations", data=data),
        }
        for name, net in cands.items():
            raw, cal = _score(net, test, calib)
            res[name] = raw
            res[name + " +BN recal"] = cal
        rows.append(res)
        log(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in res.items() if k != "seed"))
    keys = [k for k in rows[0] if k != "seed"]
    summary = {k: {"mean": mean_std([r[k] for r in rows])[0], "std": mean_std([r[k] for r in rows])[1],
                   "text": fmt([r[k] for r in rows])} for k in keys}
    report = {"config": {"seeds": list(seeds), "channels": list(channels), "half": list(half), "epochs": epochs,
                         "model": "slimkern.fl.models.small_cnn", "data": "sklearn digits 8x8 (load_digits_split)"},
              "per_seed": rows, "summary": summary, "time_s": time.perf_counter() - t0}
    write_json(os.path.join(out, "report.json"), report)
    write_csv(os.path.join(out, "results.csv"), rows)
    _plot(summary, os.path.join(out, "otfusion.png"))
    return report


def _plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    m = [100 * summary[k]["mean"] for k in names]
    s = [100 * summary[k]["std"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    colors = ["tab:gray" if k.startswith("parent") else "tab:red" if "vanilla" in k else "tab:blue" for k in names]
    ax.barh(range(len(names)), m, xerr=s, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 on the digits test split (%), mean ± std over seeds")
    ax.set_title("One-shot fusion: OT alignment vs vanilla averaging")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
