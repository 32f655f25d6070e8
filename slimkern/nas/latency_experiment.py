"""``slimkern search latency``: AOWS's latency tables against the bilinear fit and a MACs line,
on timings of this machine, with biased against uniform sampling, and latency-budgeted searches
checked by timing what they find.

Steps (one run folder):

1. A MobileNet-v1 chain space (choices ``fractions`` of each group, multiples of ``divisor``).
2. ``timings`` configurations from AOWS's biased sampler and as many uniform ones, plus
   ``validation`` uniform ones; all timed in one shuffled order (so machine drift hits every
   set alike); the validation set is timed twice, and the relative difference of the two
   timings of a configuration is the noise floor no model can beat.
3. Fits on each training set: AOWS tables for every ``regularize`` (kappa), the bilinear
   NNLS fit, and ``a + b * MACs``; each scored on the validation set (mean relative error,
   AOWS's NRMSE = RMSE / mean, Spearman rank correlation).
4. Searches: three latency budgets (30, 50 and 70 % of the way from the fastest to the slowest
   validation timing); unary ``-log(channels)`` (wider is better, a proxy without training);
   the configuration found with each model is timed again (``repeats * 3`` runs) and reported
   as a percentage of its budget.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time

import numpy as np

__all__ = ["LATENCY_DEFAULTS", "run_latency_experiment"]

LATENCY_DEFAULTS = {
    "model": "mobilenet_v1", "width_mult": 0.25, "max_width": 1.5, "divisor": 2,
    "fractions": [float(f) for f in np.linspace(0.2, 1.5, 6)], "image_size": 16, "channels": 1,
    "timings": 500, "validation": 150, "repeats": 5, "timing_warmup": 2, "reduction": "min", "regularize": [0.0, 1.0, 100.0],
    "threads": 1, "seeds": [0], "out": "runs/nas-latency", "progress": False,
}


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _scores(pred, y) -> dict:
    return {"mean_relative_error": float(np.mean(np.abs(pred - y) / y)),
            "nrmse": float(np.sqrt(np.mean((pred - y) ** 2)) / np.mean(y)), "spearman": _spearman(pred, y)}


class _MacsLine:
    """``t = a + b * MACs`` by least squares: the baseline any latency model must beat."""

    def __init__(self, macs, y):
        A = np.stack([np.ones_like(macs), macs], 1)
        self.coef = np.linalg.lstsq(A, y, rcond=None)[0]

    def __call__(self, macs):
        return self.coef[0] + self.coef[1] * np.asarray(macs, dtype=np.float64)


def run_latency_experiment(cfg: dict) -> dict:
    """Runs the experiment of the module docstring with ``cfg`` (keys of ``LATENCY_DEFAULTS``)."""
    import torch

    import slimkern as sk
    from slimkern.nas import (Platform, biased_paths, cost_model, fit_latency, fit_latency_table, measure_latency,
                              pair_counts, search, search_space)
    from slimkern.report import atomic_write_text

    unknown = sorted(set(cfg) - set(LATENCY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown latency option(s) {unknown}; known: {sorted(LATENCY_DEFAULTS)}")
    cfg = {**LATENCY_DEFAULTS, **cfg}
    for k in ("timings", "validation", "repeats"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ValueError(f"{k} must be an int >= 1, got {cfg[k]!r}")
    if cfg["model"] != "mobilenet_v1":
        raise ValueError(f"the latency experiment builds a chain net; model must be 'mobilenet_v1', got {cfg['model']!r}")
    torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seeds"][0])
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    net = sk.models.mobilenet_v1(num_classes=10, in_channels=cfg["channels"], width_mult=cfg["width_mult"],
                                 max_width=cfg["max_width"]).eval()
    sp = search_space(net, fractions=cfg["fractions"], divisor=cfg["divisor"])
    size = (1, cfg["channels"], cfg["image_size"], cfg["image_size"])
    cm = cost_model(net, sp, size)
    rng = np.random.default_rng(seed)

    def uniform(n):
        return [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(n)]

    sets = {"biased": biased_paths(sp, cfg["timings"], seed=seed), "uniform": uniform(cfg["timings"]),
            "validation": uniform(cfg["validation"])}
    sets["validation_again"] = [list(p) for p in sets["validation"]]
    jobs = [(name, i) for name, ps in sets.items() for i in range(len(ps))]
    order = rng.permutation(len(jobs))
    seconds = {name: np.zeros(len(ps)) for name, ps in sets.items()}
    paths = [sets[jobs[k][0]][jobs[k][1]] for k in order]
    measured = measure_latency(net, sp, paths, size, repeats=cfg["repeats"], warmup=cfg["timing_warmup"],
                               progress=cfg["progress"], reduction=cfg["reduction"])
    for k, t in zip(order, measured):
        seconds[jobs[k][0]][jobs[k][1]] = t
    yv, yv2 = seconds["validation"], seconds["validation_again"]
    macs = {name: np.array([cm.of_path(p) for p in ps], dtype=np.float64) for name, ps in sets.items()}
    report = {"config": cfg, "space": {"groups": list(sp.groups), "choices": [list(c) for c in sp.choices],
                                       "table_entries": int(sum(len(sp.choices[l]) * len(sp.choices[l + 1])
                                                                for l in range(sp.num_layers - 1)))},
              "noise_floor": {"mean_relative_difference": float(np.mean(np.abs(yv - yv2) / yv)),
                              "nrmse": float(np.sqrt(np.mean((yv - yv2) ** 2)) / np.mean(yv)),
                              "spearman": _spearman(yv, yv2)},
              "timing_range_ms": [float(min(map(np.min, seconds.values())) * 1e3),
                                  float(max(map(np.max, seconds.values())) * 1e3)],
              "fits": [], "searches": []}
    models = {}
    for train in ("biased", "uniform"):
        ps, y = sets[train], seconds[train]
        cover = pair_counts(sp, ps)
        base = {"train": train, "coverage": float(np.mean(np.concatenate([(c > 0).ravel() for c in cover]))),
                "min_count": int(min(c.min() for c in cover))}
        for kappa in cfg["regularize"]:
            t0 = time.perf_counter()
            m = fit_latency_table(sp, ps, y, regularize=float(kappa), validation_fraction=0.0)
            models[(train, f"table kappa={kappa:g}")] = m
            report["fits"].append({**base, "model": f"table kappa={kappa:g}", **_scores(m.predict(sets["validation"]), yv),
                                   "violations": m.violations, "fit_seconds": time.perf_counter() - t0})
        m = fit_latency(sp, ps, y, validation_fraction=0.0)
        models[(train, "bilinear")] = m
        report["fits"].append({**base, "model": "bilinear", **_scores(m.predict(sets["validation"]), yv)})
        line = _MacsLine(macs[train], y)
        report["fits"].append({**base, "model": "a + b MACs", **_scores(line(macs["validation"]), yv)})
    # latency-budgeted searches, checked by timing the configurations found
    lo, hi = float(yv.min()), float(yv.max())
    unary = np.full((sp.num_layers, sp.max_choices), np.inf)
    for l, ch in enumerate(sp.choices):
        unary[l, :len(ch)] = -np.log(np.asarray(ch, dtype=np.float64))
    budgets = [lo + f * (hi - lo) for f in (0.3, 0.5, 0.7)]
    for (train, name), m in models.items():
        if train != "biased":
            continue
        cm.set_latency(m)
        for b in budgets:
            row = {"model": name, "budget_ms": b * 1e3}
            try:
                p = sp.path(search(cm, unary, [Platform("b", b, 1.0, "latency")])["b"])
            except ValueError as exc:  # the model says even the narrowest configuration is too slow
                report["searches"].append({**row, "error": str(exc)})
                continue
            t = float(measure_latency(net, sp, [p], size, repeats=3 * cfg["repeats"], warmup=cfg["timing_warmup"],
                                      reduction=cfg["reduction"])[0])
            report["searches"].append({**row, "predicted_ms": float(m.predict([p])[0]) * 1e3, "measured_ms": t * 1e3,
                                       "measured_percent_of_budget": 100 * t / b, "macs": cm.of_path(p),
                                       "channels": sp.channels(p)})
    report["seconds"] = time.perf_counter() - t_start
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "path", "macs", "seconds"])
    for name, ps in sets.items():
        for p, t, mc in zip(ps, seconds[name], macs[name]):
            w.writerow([name, " ".join(map(str, p)), int(mc), f"{t:.6e}"])
    atomic_write_text(os.path.join(out, "samples.csv"), buf.getvalue())
    atomic_write_text(os.path.join(out, "summary.md"), latency_summary(report))
    _plot(out, sets, seconds, models, macs)
    return report


def latency_summary(report: dict) -> str:
    nf = report["noise_floor"]
    lines = [f"# Latency models on this machine ({report['space']['table_entries']} table entries, "
             f"timings {report['timing_range_ms'][0]:.2f}-{report['timing_range_ms'][1]:.2f} ms)", "",
             f"noise floor (validation set timed twice): mean relative difference "
             f"{100 * nf['mean_relative_difference']:.1f} %, NRMSE {100 * nf['nrmse']:.1f} %, "
             f"Spearman {nf['spearman']:.3f}", "",
             "| training set | coverage | model | mean rel. error % | NRMSE % | Spearman |", "|---|---|---|---|---|---|"]
    for f in report["fits"]:
        lines.append(f"| {f['train']} (min count {f['min_count']}) | {100 * f['coverage']:.1f} % | {f['model']} | "
                     f"{100 * f['mean_relative_error']:.1f} | {100 * f['nrmse']:.1f} | {f['spearman']:.3f} |")
    lines += ["", "| model (biased set) | budget ms | predicted ms | measured ms | measured % of budget |",
              "|---|---|---|---|---|"]
    for s in report["searches"]:
        if "error" in s:
            lines.append(f"| {s['model']} | {s['budget_ms']:.2f} | infeasible by the model | - | - |")
            continue
        lines.append(f"| {s['model']} | {s['budget_ms']:.2f} | {s['predicted_ms']:.2f} | {s['measured_ms']:.2f} | "
                     f"{s['measured_percent_of_budget']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(out, sets, seconds, models, macs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    from slimkern.report import save_figure

    yv = seconds["validation"] * 1e3
    names = [k for k in models if k[0] == "biased"]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1), 3.6), squeeze=False)
    axes = axes[0]
    for ax, key in zip(axes, names):
        ax.scatter(yv, models[key].predict(sets["validation"]) * 1e3, s=6)
        ax.set_title(f"{key[1]} ({key[0]})", fontsize=9)
    axes[-1].scatter(yv, seconds["validation_again"] * 1e3, s=6, color="C3")
    axes[-1].set_title("timed again (noise floor)", fontsize=9)
    for ax in axes:
        ax.plot([yv.min(), yv.max()], [yv.min(), yv.max()], "k--", lw=0.8)
        ax.set_xlabel("measured ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted ms")
    save_figure(fig, os.path.join(out, "latency.png"), dpi=120, bbox_inches="tight")
