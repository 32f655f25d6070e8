"""The training jobs behind the ParaDiS paper's tables, at digits scale, cached per (job, seed, epochs).

Every job trains one network on scikit-learn's digits at their native 8x8 (x3 channels; a
quarter of the demo's 16x16 MACs, so 11 jobs x 3 seeds fit a shared 2-core machine),
MobileNet-v1 CIFAR variant at ``width_mult=0.5`` with the ``slimkern demo paradis`` optimiser
(SGD Nesterov, lr 0.1, cosine, batch 32, 1 warm-up epoch, gradient clipping at 5), calibrates BN for its evaluation switches and
evaluates them on the test split. Ozerov, Lambert & Kumaraswamy, "ParaDiS: Parallelly
Distributable Slimmable Neural Networks" (arXiv:2110.02724):

- ``paradis`` -- Algorithm 1 with the wide teacher and activation distillation beta = 1
  ("Wide IPKD-A", the paper's method), switches [1.2], [1.0], [0.5,0.5], [4x0.25];
  ``paradis-b0.1`` the same with beta = 0.1; ``paradis-wide-ipkd`` beta = 0;
- ``paradis-ipkd`` -- no wide switch: [1.0] learns from labels, the others distil from it
  ("IPKD"); ``paradis-nokd`` -- every switch from labels alone ("No KD");
- ``us`` / ``us-wide`` -- universally slimmable (Yu & Huang 2019): sandwich rule (max, min 0.25,
  two random widths) with in-place distillation, max width 1.0 / 1.2 ("US Wide IPKD");
- ``slimmable`` -- fixed-width slimmable network (Yu et al. 2019): widths 1.0, 0.75, 0.5, 0.25,
  each from labels;
- ``indiv-<switch>`` -- an individual model: one switch alone, from labels.

A job's result is a JSON list of evaluated switches in ``<cache>/<job>-e<epochs>-s<seed>.json``
(written atomically); a cached result is reused, so commands that share jobs (the baselines,
the ablation and Figure 4 all need ``paradis``) train each once.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import torch

from slimkern.report import atomic_write_text

log = logging.getLogger("slimkern.paradis")

PARADIS_SWITCHES = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
UNTRAINED = ["[0.5, 0.25, 0.25]x"]
SMALL = ["[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
US_GRID = [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
BASE = {"dataset": "digits", "image_size": 8, "channels": 3, "model": "mobilenet_v1", "width_mult": 0.5,
        "batch_size": 32, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1.0,
        "clip_grad_norm": 5.0, "calibrate_batches": 20, "progress": False}

JOBS: dict[str, dict] = {
    "paradis": {"recipe": "paradis", "max_width": 1.2, "switches": PARADIS_SWITCHES, "kd": "wide", "beta": 1.0,
                "eval": PARADIS_SWITCHES + UNTRAINED},
    "paradis-b0.1": {"recipe": "paradis", "max_width": 1.2, "switches": PARADIS_SWITCHES, "kd": "wide", "beta": 0.1,
                     "eval": PARADIS_SWITCHES + UNTRAINED},
    "paradis-wide-ipkd": {"recipe": "paradis", "max_width": 1.2, "switches": PARADIS_SWITCHES, "kd": "wide",
                          "beta": 0.0, "eval": PARADIS_SWITCHES + UNTRAINED},
    "paradis-ipkd": {"recipe": "paradis", "max_width": 1.0, "switches": SMALL, "kd": "full", "beta": 0.0,
                     "eval": SMALL + UNTRAINED},
    "paradis-nokd": {"recipe": "paradis", "max_width": 1.0, "switches": SMALL, "kd": "none", "beta": 0.0,
                     "eval": SMALL + UNTRAINED},
    "us": {"recipe": "sandwich", "max_width": 1.0, "min_width": 0.25, "n_random": 2, "eval": "us"},
    "us-wide": {"recipe": "sandwich", "max_width": 1.2, "min_width": 0.25, "n_random": 2, "eval": "us"},
    "slimmable": {"recipe": "paradis", "max_width": 1.0, "switches": ["[1.0]x", "[0.75]x", "[0.5]x", "[0.25]x"],
                  "kd": "none", "beta": 0.0, "eval": ["[1.0]x", "[0.75]x", "[0.5]x", "[0.25]x"]},
}
for _s in SMALL:
    JOBS["indiv-" + _s.strip("[]x").replace(" ", "")] = {"recipe": "individual", "max_width": 1.0, "switches": [_s],
                                                         "eval": [_s]}


def _cfg(job: str, seed: int, epochs: int) -> dict:
    from slimkern import runner

    spec = JOBS[job]
    cfg = {**runner.DEFAULTS, **BASE, "seed": seed, "epochs": epochs}
    cfg.update({k: v for k, v in spec.items() if k != "eval"})
    return cfg


@functools.lru_cache(maxsize=8)
def matched_us_widths(input_size=None, max_width: float = 1.0, step: float = 1 / 32) -> dict[str, float]:
    """For every ParaDiS switch (trained and untrained), the universally-slimmable width on a
    ``step`` grid whose total MACs are closest to the switch's total MACs (the paper's tables
    pair e.g. [0.5,0.5] with US 0.725x). Costs from the closed forms of ``slimkern.profile``."""
    from slimkern import models, runner
    from slimkern.evaluate import switch_cost

    if input_size is None:
        input_size = (1, BASE["channels"], BASE["image_size"], BASE["image_size"])
    net = models.build("mobilenet_v1", num_classes=10, in_channels=3, max_width=max_width, width_mult=0.5)
    grid = [round(k * step, 6) for k in range(round(0.25 / step), round(max_width / step) + 1)]
    us = {w: switch_cost(net, runner.parse_switch(w), input_size)[0] for w in grid}
    out = {}
    for s in SMALL + UNTRAINED:
        target = switch_cost(net, runner.parse_switch(s), input_size)[0]
        out[s] = min(grid, key=lambda w: (abs(us[w] - target), w))
    return out


def eval_switches(job: str) -> list[str]:
    ev = JOBS[job]["eval"]
    if ev != "us":
        return list(ev)
    widths = set(US_GRID) | set(matched_us_widths().values())
    if JOBS[job]["max_width"] > 1.0:
        widths.add(JOBS[job]["max_width"])
    return [f"[{w:g}]x" for w in sorted(widths)]


def run_job(job: str, seed: int, epochs: int, cache: str) -> list[dict]:
    """Train + calibrate + evaluate one job (or read its cached result). Returns one dict per
    evaluated switch: switch, top1, macs, max_device_macs, params, trained, branches."""
    import slimkern
    from torch.utils.data import DataLoader

    from slimkern import runner

    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; have {sorted(JOBS)}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    path = os.path.join(cache, f"{job}-e{epochs}-s{seed}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)["rows"]
    t0 = time.perf_counter()
    cfg = _cfg(job, seed, epochs)
    split = runner.load_data(cfg)
    net = runner.build_model(cfg, split)
    trainer = runner.make_trainer(cfg, net, None)
    log.info("job %s seed %d: %d epochs", job, seed, epochs)
    trainer.fit(split.train, epochs, batch_size=cfg["batch_size"])
    sws = [runner.parse_switch(s) for s in eval_switches(job)]
    calib = DataLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                       generator=torch.Generator().manual_seed(seed + 7))
    slimkern.calibrate_bn(net, calib, sws, num_batches=cfg["calibrate_batches"])
    test = DataLoader(split.test, batch_size=256, shuffle=False)
    rep = slimkern.evaluate(net, test, sws, trained=trainer.trained_switches(), input_size=split.input_size)
    rows = [{"switch": r.switch, "top1": r.top1, "macs": r.macs, "max_device_macs": r.max_device_macs,
             "params": r.params, "trained": r.trained, "branches": r.branches} for r in rep.results]
    collapsed = any("collapsed" in h for h in trainer.history)
    atomic_write_text(path, json.dumps({"job": job, "seed": seed, "epochs": epochs, "rows": rows,
                                        "collapsed": collapsed, "seconds": round(time.perf_counter() - t0, 1),
                                        "config": {k: v for k, v in cfg.items() if k != "seeds"}}, indent=1) + "\n")
    return rows


def is_cached(job: str, seed: int, epochs: int, cache: str) -> bool:
    return os.path.isfile(os.path.join(cache, f"{job}-e{epochs}-s{seed}.json"))


def run_jobs(jobs, seeds, epochs: int, cache: str, echo=None,
             cached_only: bool = False) -> dict[str, dict[int, list[dict]]]:
    """``{job: {seed: rows}}`` for every job and seed (cached results reused). With
    ``cached_only`` nothing trains: a job missing for any seed is left out of the result."""
    out: dict[str, dict[int, list[dict]]] = {}
    for job in jobs:
        if cached_only and not all(is_cached(job, s, epochs, cache) for s in seeds):
            continue
        for s in seeds:
            t0 = time.perf_counter()
            out.setdefault(job, {})[s] = run_job(job, s, epochs, cache)
            if echo is not None:
                echo(f"{job} seed {s}: " + ", ".join(f"{r['switch']} {100 * r['top1']:.1f}" for r in out[job][s])
                     + f" ({time.perf_counter() - t0:.0f} s)")
    return out
