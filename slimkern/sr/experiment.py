"""The ParaDiS paper's Figure 7 at CPU scale: WDSR x2 super-resolution, PSNR vs MACs.

For every seed, on scikit-image's photographs (``slimkern.data.images``):

* a **ParaDiS** WDSR trained with switches ``[1.0], [0.5,0.5], [4x0.25]``
  (``SRParaDiSTrainer``), evaluated on those and on untrained ("free") switches;
* a **US-Nets** WDSR (sandwich rule + in-place distillation, widths in [0.25, 1.0]),
  evaluated at a grid of widths and at the width whose total MACs match each ParaDiS switch;
* **individual** WDSRs of widths 1.0, 0.5, 0.25, each trained alone;
* the **bicubic** baseline.

Every switch learns from the ground truth by default (``kd=False, beta=0, us_kd=False``):
with in-place distillation (an L1 loss to the detached widest output) the shared tail's
magnitudes and the shared skip conv are pulled by two or three sign-sized distillation
gradients against one ground-truth gradient, and at this scale every switch ended *below*
bicubic with identical PSNR (measured, see docs/paradis_sr_deploy.md); ``--kd --beta 1
--us-kd`` runs that recipe.

With ``init="bicubic"`` (the default here) every net starts as bicubic upsampling (the skip
conv holds the bicubic filters, the tail's magnitudes are zero) and learns the residual: at
a few hundred CPU steps this is what makes the widths comparable above the baseline.

Every net trains the same number of steps on the same patches. The plot shows PSNR (Y
channel, border = scale) against multiply-accumulates for one low-resolution test image: the
ParaDiS switches at their total MACs and, as the *distributed* curve, at the MACs of the
busiest device (its branch plus the image skip, computed where the branches are fused).

``python -m slimkern.sr.experiment --out runs/sr-wdsr`` (or ``slimkern sr``) writes
``report.json``, ``results.csv`` (one row per seed, method, switch), ``summary.csv``
(mean ± std over seeds) and ``figure7.png`` into the run folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from slimkern.report import save_figure
from slimkern.runfolder import add_options as _add
from slimkern.runfolder import experiment_main, start, summarize, write_csv, write_json

log = logging.getLogger("slimkern.sr")

DEFAULTS: dict = {
    "seeds": [0, 1, 2], "scale": 2, "n_feats": 64, "width_mult": 0.25, "n_blocks": 2, "expansion": 4,
    "init": "bicubic", "patch": 32, "num_patches": 1200, "batch_size": 8, "epochs": 2, "lr": 1e-3,
    "beta": 0.0, "kd": False, "us_kd": False,
    "test_crop": 256, "threads": 1,
    "paradis": ["[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"], "free": ["[0.5, 0.25, 0.25]x", "[2x0.25]x"],
    "individual": [1.0, 0.5, 0.25], "us_widths": [0.25, 0.5, 0.75, 1.0], "us_min": 0.25,
    "out": "runs/sr-wdsr",
}


def evaluate_psnr(net, switches, test, scale: int) -> dict:
    """Mean Y-PSNR over the test photographs per switch (``{str(switch): dB}``), eval mode."""
    from slimkern.nn.switching import as_switch, use_switch
    from slimkern.sr.metrics import psnr_y

    net.eval()
    res = {}
    with torch.no_grad():
        for s in switches:
            sw = as_switch(s)
            with use_switch(net, sw):
                vals = [psnr_y(net(lr), hr, scale) for _, lr, hr in test]
            res[str(sw)] = sum(vals) / len(vals)
    return res


def matched_width(net, sw, h: int, w: int) -> float:
    """The one-branch width (a whole number of feature channels) whose total MACs are closest
    to switch ``sw``'s: the US-Nets switch the paper compares a ParaDiS switch with."""
    from slimkern.switch import Switch

    target = net.branch_macs(sw, h, w)["total"]
    cands = [k / net.feats for k in range(1, net.feats + 1)]
    return min(cands, key=lambda f: abs(net.branch_macs(Switch([f]), h, w)["total"] - target))


def _net(cfg, seed):
    from slimkern.models import build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build("wdsr", scale=cfg["scale"], n_feats=cfg["n_feats"], width_mult=cfg["width_mult"],
                     n_blocks=cfg["n_blocks"], expansion=cfg["expansion"], init=cfg["init"])


def _fit(trainer, data, cfg):
    t = time.perf_counter()
    trainer.fit(data, cfg["epochs"], batch_size=cfg["batch_size"])
    return time.perf_counter() - t


def run_seed(cfg: dict, seed: int, split) -> list[dict]:
    """Trains and evaluates every method for one seed; returns result rows."""
    from slimkern.data.images import bicubic_up
    from slimkern.nn.switching import as_switch
    from slimkern.sr.metrics import psnr_y
    from slimkern.sr.recipes import SRIndividualTrainer, SRParaDiSTrainer, SRSandwichTrainer
    from slimkern.switch import Switch

    kw = dict(lr=cfg["lr"], seed=seed, progress=False, schedule="cosine")
    _, lr0, _ = split.test[0]
    h, w = lr0.shape[-2:]
    rows = []

    def add(method, net, results, trained, secs):
        for s, p in results.items():
            m = net.branch_macs(as_switch(s), h, w)
            rows.append({"seed": seed, "method": method, "switch": s, "trained": s in trained, "psnr": round(p, 4),
                         "macs": m["total"], "max_device_macs": m["max_device"],
                         "branches": as_switch(s).num_branches, "train_seconds": round(secs, 1)})

    bic = sum(psnr_y(bicubic_up(lr, cfg["scale"]), hr, cfg["scale"]) for _, lr, hr in split.test) / len(split.test)
    rows.append({"seed": seed, "method": "bicubic", "switch": "-", "trained": False, "psnr": round(bic, 4),
                 "macs": 0, "max_device_macs": 0, "branches": 0, "train_seconds": 0.0})

    net = _net(cfg, seed)
    tr = SRParaDiSTrainer(net, cfg["paradis"], beta=cfg["beta"], kd=cfg["kd"], **kw)
    secs = _fit(tr, split.train, cfg)
    trained = [str(s) for s in tr.trained_switches()]
    sws = [str(as_switch(s)) for s in cfg["paradis"] + cfg["free"]]
    add("paradis", net, evaluate_psnr(net, sws, split.test, cfg["scale"]), trained, secs)
    log.info("seed %d paradis done in %.0f s", seed, secs)

    net_us = _net(cfg, seed)
    tr = SRSandwichTrainer(net_us, max_width=1.0, min_width=cfg["us_min"], n_random=2, width_step=None,
                           inplace_kd=cfg["us_kd"], **kw)
    secs = _fit(tr, split.train, cfg)
    widths = list(cfg["us_widths"]) + [matched_width(net_us, as_switch(s), h, w) for s in cfg["paradis"]]
    widths = sorted(set(round(x, 6) for x in widths))
    add("us", net_us, evaluate_psnr(net_us, [Switch([x]) for x in widths], split.test, cfg["scale"]),
        [str(Switch([1.0])), str(Switch([cfg["us_min"]]))], secs)
    log.info("seed %d us done in %.0f s", seed, secs)

    for x in cfg["individual"]:
        sw = Switch([float(x)])
        inet = _net(cfg, seed)
        tr = SRIndividualTrainer(inet, sw, **kw)
        secs = _fit(tr, split.train, cfg)
        add("individual", inet, evaluate_psnr(inet, [sw], split.test, cfg["scale"]), [str(sw)], secs)
    log.info("seed %d individual done", seed)
    return rows


def plot(summary: list[dict], path: str, title: str, us_label: str = "US-Nets (sandwich rule)") -> None:
    """PSNR vs MACs: ParaDiS (total and distributed), free switches, US curve, individual
    diamonds, bicubic line; error bars are the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))

    def pts(method, trained=None, x="macs"):
        r = [s for s in summary if s["method"] == method and (trained is None or s["trained"] == trained)]
        r.sort(key=lambda s: s[x])
        return r

    def draw(rs, x, label, **style):
        if rs:
            ax.errorbar([s[x] / 1e6 for s in rs], [s["psnr_mean"] for s in rs], yerr=[s["psnr_std"] for s in rs],
                        label=label, capsize=3, **style)

    par = pts("paradis", True)
    draw(par, "macs", "ParaDiS (total MACs)", marker="o", color="C0")
    dist = sorted(par, key=lambda s: s["max_device_macs"])
    draw(dist, "max_device_macs", "ParaDiS distributed (MACs of the busiest device)", marker="o", color="C0",
         linestyle="--", mfc="white")
    draw(pts("paradis", False), "macs", "ParaDiS untrained switches", marker="o", color="C0", linestyle="none",
         mfc="none", markersize=9)
    draw(pts("us"), "macs", us_label, marker="s", color="C1")
    draw(pts("individual"), "macs", "individual models", marker="D", color="C2", linestyle="none", markersize=8)
    for s in par + pts("paradis", False):
        ax.annotate(s["switch"].replace(", ", ","), (s["macs"] / 1e6, s["psnr_mean"]), textcoords="offset points",
                    xytext=(4, -11), fontsize=7, color="C0")
    for s in pts("individual"):
        ax.annotate(s["switch"], (s["macs"] / 1e6, s["psnr_mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color="C2")
    bic = [s for s in summary if s["method"] == "bicubic"]
    if bic:
        ax.axhline(bic[0]["psnr_mean"], color="grey", linestyle=":", label="bicubic")
    ax.set_xscale("log")
    ax.set_xlabel("multiply-accumulates per low-resolution test image (millions, log scale)")
    ax.set_ylabel("PSNR on Y (dB), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def run(cfg: dict) -> dict:
    """The whole experiment into ``cfg["out"]``; returns the report dict."""
    from slimkern.data.images import super_resolution

    cfg, out = start(cfg, DEFAULTS, "sr experiment")
    t0 = time.perf_counter()
    rows, report = [], {}
    for k, seed in enumerate(cfg["seeds"]):
        split = super_resolution(cfg["scale"], cfg["patch"], cfg["num_patches"], cfg["test_crop"], seed=seed)
        rows += run_seed(cfg, seed, split)
        report = _write(cfg, out, rows, cfg["seeds"][:k + 1], time.perf_counter() - t0)  # complete after every seed
    return report


def _write(cfg: dict, out: str, rows: list[dict], seeds: list[int], seconds: float) -> dict:
    write_csv(os.path.join(out, "results.csv"), rows)
    summary = summarize(rows, ["method", "switch"], "psnr", carry=["trained", "macs", "max_device_macs", "branches"])
    for s in summary:
        s["psnr_mean"], s["psnr_std"] = round(s["psnr_mean"], 3), round(s["psnr_std"], 3)
    write_csv(os.path.join(out, "summary.csv"), summary)
    lr_hw = cfg["test_crop"] // cfg["scale"] if cfg["test_crop"] else None
    report = {"experiment": "ParaDiS Figure 7: WDSR x2 on scikit-image photographs", "config": cfg,
              "seeds_done": seeds, "lr_test_size": lr_hw, "seconds": round(seconds, 1),
              "torch_threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    write_json(os.path.join(out, "report.json"), report)
    plot(summary, os.path.join(out, "figure7.png"),
         f"WDSR x{cfg['scale']} ({cfg['n_blocks']} blocks, {int(cfg['n_feats'] * cfg['width_mult'])} features, "
         f"expansion {cfg['expansion']}), {len(seeds)} seed(s)",
         "US-Nets (sandwich rule" + (", in-place KD)" if cfg["us_kd"] else ", ground truth for every width)"))
    return report


def add_options(p: argparse.ArgumentParser) -> None:
    _add(p, DEFAULTS, {"seeds": int, "individual": float, "us_widths": float})


def table(summary: list[dict]) -> str:
    lines = [f"{'method':<11}{'switch':<28}{'trained':<8}{'MMACs':>9}{'max dev':>9}  PSNR (dB)"]
    for s in summary:
        lines.append(f"{s['method']:<11}{s['switch']:<28}{str(s['trained']):<8}{s['macs'] / 1e6:>9.1f}"
                     f"{s['max_device_macs'] / 1e6:>9.1f}  {s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return experiment_main("python -m slimkern.sr.experiment", __doc__, add_options, run,
                           lambda rep: table(rep["summary"]), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
