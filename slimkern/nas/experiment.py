"""The Table-2 experiment of Wang & Blaschko on a small scale: search, retrain, weighted accuracy.

For each seed: the OWS search net is trained once (uniform sampling does not depend on the
market weights), the AOWS search net once per weight setting (platforms sampled by weight);
``search`` gives one configuration per platform. The baselines Slim-U/-W use uniform widths,
each the widest whose MACs fit the platform's budget. Every configuration set is retrained from
scratch as a slimmable net sampled uniformly (``-U``) or by platform weight (``-W``), its BN
statistics calibrated per configuration, and scored by the weighted top-1
``sum_k mu_k acc_k`` under each setting of ``WEIGHT_SETTINGS``.

The run folder holds ``config.json``, ``jobs/`` (one JSON per finished training; a rerun skips
them), ``found.json`` (configurations, MACs and percentage of budget per platform, measured
with ``slimkern.profile``), ``table2.json`` / ``table2.csv`` (per seed and mean/std over seeds)
and ``channels.png`` (channels per layer of platforms #6/#7 against uniform scaling, the
paper's Figure 2).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time

import numpy as np
import torch

from slimkern.nas.costs import cost_model
from slimkern.nas.platforms import WEIGHT_SETTINGS, Platform
from slimkern.nas.search import search
from slimkern.nas.space import AOWS_FRACTIONS, search_space
from slimkern.nas.train import ConfigTrainer, WidthSearchTrainer
from slimkern.report import atomic_write_text, save_figure
from slimkern.switch import Switch

log = logging.getLogger("slimkern.nas")

__all__ = ["DEFAULTS", "DEMO", "run_experiment"]

#: The experiment's options (the ``slimkern search`` config keys).
DEFAULTS: dict = {
    "dataset": "digits", "image_size": 8, "channels": 3, "model": "mobilenet_v1", "width_mult": 0.25,
    "max_width": 1.5, "divisor": 2, "fractions": list(AOWS_FRACTIONS),
    "budgets": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], "settings": list(WEIGHT_SETTINGS),
    "methods": ["slim", "ows", "aows"], "variants": ["U", "W"], "seeds": [0, 1, 2],
    "search_epochs": 6, "warmup": 2, "retrain_epochs": 8, "batch_size": 64, "lr": 0.1, "weight_decay": 5e-4,
    "window": 100000, "attribution": "aows", "clip_grad_norm": 5.0, "calibrate_batches": 10, "threads": 1,
    "out": "runs/nas",
    "progress": True,
}
#: ``slimkern demo nas``: one seed, three settings, short schedules (minutes on 2 CPU cores).
DEMO: dict = dict(DEFAULTS, seeds=[0], settings=["S", "RS", "U"], search_epochs=3, warmup=1, retrain_epochs=3,
                  out="runs/demo-nas")

_METHOD_NAMES = {"slim": "Slim", "ows": "OWS", "aows": "AOWS"}


def check_config(cfg: dict) -> dict:
    """Fills defaults and validates the experiment options with messages naming the key."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown nas option(s) {unknown}; known: {sorted(DEFAULTS)}")
    c = dict(DEFAULTS, **cfg)
    if c["dataset"] != "digits":
        raise ValueError(f"dataset: only 'digits' is wired into the nas experiment, got {c['dataset']!r}")
    bad = [s for s in c["settings"] if s not in WEIGHT_SETTINGS]
    if bad or not c["settings"]:
        raise ValueError(f"settings: choose from {list(WEIGHT_SETTINGS)}, got {c['settings']}")
    bad = [m for m in c["methods"] if m not in _METHOD_NAMES]
    if bad or not c["methods"]:
        raise ValueError(f"methods: choose from {list(_METHOD_NAMES)}, got {c['methods']}")
    if not c["variants"] or any(v not in ("U", "W") for v in c["variants"]):
        raise ValueError(f"variants: 'U' and/or 'W', got {c['variants']}")
    b = c["budgets"]
    if len(b) != 7 or any(not 0 < f <= 1.5 for f in b):
        raise ValueError(f"budgets: seven fractions of the 1.0x net's MACs in (0, 1.5], got {b} (Table 1 has "
                         "seven platforms)")
    for k in ("search_epochs", "retrain_epochs", "batch_size", "calibrate_batches", "window"):
        if not isinstance(c[k], int) or c[k] < 1:
            raise ValueError(f"{k} must be a positive int, got {c[k]!r}")
    if not isinstance(c["warmup"], int) or not 0 <= c["warmup"] < c["search_epochs"]:
        raise ValueError(f"warmup must be an int in [0, search_epochs), got {c['warmup']!r}")
    if isinstance(c["clip_grad_norm"], bool) or not isinstance(c["clip_grad_norm"], (int, float)) \
            or not c["clip_grad_norm"] >= 0:
        raise ValueError(f"clip_grad_norm must be a number >= 0 (0: off), got {c['clip_grad_norm']!r}")
    if not c["seeds"]:
        raise ValueError("seeds: give at least one seed")
    return c


def _atomic_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class _Run:
    def __init__(self, cfg: dict):
        import slimkern as sk

        self.cfg, self.sk = cfg, sk
        self.data = sk.data.digits(image_size=cfg["image_size"], channels=cfg["channels"], seed=0)
        self.input_size = self.data.input_size
        net = self.make_net(0)
        self.space = search_space(net, cfg["fractions"], cfg["divisor"])
        self.costs = cost_model(net, self.space, self.input_size)
        self.full_macs = self.costs.evaluate(self.space.uniform_channels(1.0))
        self.budgets = [f * self.full_macs for f in cfg["budgets"]]
        self.slim = [self.uniform_switch(b) for b in self.budgets]
        self._macs_cache: dict = {}

    def make_net(self, seed):
        torch.manual_seed(seed)
        c = self.cfg
        return self.sk.models.build(c["model"], num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                                    max_width=c["max_width"], width_mult=c["width_mult"])

    def macs(self, sw: Switch) -> int:
        return self.sk.profile(self.make_net(0).eval(), sw, self.input_size).macs

    def uniform_switch(self, budget) -> Switch:
        """The widest uniform width (grid 1/200) whose MACs fit ``budget``."""
        best = None
        for w in np.arange(0.05, self.cfg["max_width"] + 1e-9, 0.005):
            ch = self.space.uniform_channels(float(w))
            if self.costs.evaluate(ch) <= budget:
                best = float(round(w, 4))
        if best is None:
            raise ValueError(f"no uniform width fits a budget of {budget:.0f} MACs")
        return Switch([best])

    def platforms(self, setting):
        w = WEIGHT_SETTINGS[setting]
        return [Platform(f"#{i + 1}", b, w[i]) for i, b in enumerate(self.budgets)]

    def trainer_kw(self, seed, lr=None):
        c = self.cfg
        return dict(lr=c["lr"] if lr is None else lr, weight_decay=c["weight_decay"], seed=seed, progress=False,
                    clip_grad_norm=c["clip_grad_norm"] if c["clip_grad_norm"] > 0 else None)

    def search_configs(self, method, setting, seed, lr=None) -> tuple[list[Switch], dict]:
        c = self.cfg
        net = self.make_net(seed)
        plats = self.platforms(setting or "U")
        tr = WidthSearchTrainer(net, self.space, plats, c["search_epochs"], adaptive=(method == "aows"),
                                warmup=c["warmup"], costs=self.costs, window=c["window"],
                                attribution=c["attribution"], **self.trainer_kw(seed, lr))
        t0 = time.perf_counter()
        tr.fit(self.data.train, c["search_epochs"], c["batch_size"])
        res = search(self.costs, tr.stats, plats)
        return [res[p.name] for p in plats], {"train_seconds": time.perf_counter() - t0,
                                              "search_seconds": res.seconds,
                                              "unary": tr.stats.unary().tolist()}

    def retrain(self, switches, weights, seed, lr=None) -> list[float]:
        c, sk = self.cfg, self.sk
        net = self.make_net(seed)
        tr = ConfigTrainer(net, switches, weights=weights, order_key=self.macs_cached, **self.trainer_kw(seed, lr))
        tr.fit(self.data.train, c["retrain_epochs"], c["batch_size"])
        loader = torch.utils.data.DataLoader(self.data.train, batch_size=c["batch_size"], shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        uniq = list(dict.fromkeys(switches))
        sk.calibrate_bn(net, loader, uniq, num_batches=c["calibrate_batches"])
        test = torch.utils.data.DataLoader(self.data.test, batch_size=256)
        acc = {}
        net.eval()
        with torch.no_grad():
            for sw in uniq:
                right = n = 0
                with sk.use_switch(net, sw):
                    for x, y in test:
                        right += int((net(x).argmax(1) == y).sum())
                        n += len(y)
                acc[sw] = right / n
        return [acc[s] for s in switches]

    def macs_cached(self, sw):
        if sw not in self._macs_cache:
            self._macs_cache[sw] = self.macs(sw)
        return self._macs_cache[sw]


def _jobs(cfg):
    """(kind, method, variant, setting, seed) in run order; settings None where they do not matter."""
    out = []
    for seed in cfg["seeds"]:
        for m in cfg["methods"]:
            if m == "ows":
                out.append(("search", "ows", None, None, seed))
            elif m == "aows":
                out += [("search", "aows", None, s, seed) for s in cfg["settings"]]
        for m in cfg["methods"]:
            for v in cfg["variants"]:
                per_setting = v == "W" or m == "aows"
                for s in (cfg["settings"] if per_setting else [None]):
                    out.append(("retrain", m, v, s, seed))
    return out


def _key(kind, m, v, s, seed):
    return f"{kind}-{m}" + (f"-{v}" if v else "") + (f"-{s}" if s else "") + f"-seed{seed}"


def run_experiment(cfg: dict | None = None) -> dict:
    """Runs (or resumes) the experiment in ``cfg["out"]``; returns the Table-2 summary."""
    from tqdm.auto import tqdm

    c = check_config(cfg or {})
    if c["threads"]:
        torch.set_num_threads(int(c["threads"]))
    out = c["out"]
    os.makedirs(os.path.join(out, "jobs"), exist_ok=True)
    _atomic_json(os.path.join(out, "config.json"), c)
    run = _Run(c)
    jobs = _jobs(c)
    done: dict[str, dict] = {}
    bar = tqdm(jobs, desc="nas experiment", disable=not c["progress"], dynamic_ncols=True)
    for job in bar:
        kind, m, v, s, seed = job
        key = _key(*job)
        path = os.path.join(out, "jobs", key + ".json")
        bar.set_postfix_str(key)
        if os.path.isfile(path):
            with open(path) as fh:
                done[key] = json.load(fh)
            continue
        t0 = time.perf_counter()
        lr = c["lr"]
        for attempt in range(3):  # a diverged training (non-finite loss) is rerun at half the lr
            try:
                rec = _run_job(run, done, kind, m, v, s, seed, lr)
                break
            except FloatingPointError as e:
                if attempt == 2:
                    raise
                log.warning("%s diverged at lr %g (%s); rerunning at lr %g", key, lr, e, lr / 2)
                lr /= 2
        rec["lr"] = lr
        rec["seconds"] = time.perf_counter() - t0
        _atomic_json(path, rec)
        done[key] = rec
        log.info("%s done in %.1f s", key, rec["seconds"])
    bar.close()
    return _write_reports(c, run, done)


def _run_job(run, done, kind, m, v, s, seed, lr) -> dict:
    if kind == "search":
        sws, info = run.search_configs(m, s, seed, lr)
        return {"switches": [str(x) for x in sws], **info}
    if m == "slim":
        sws = run.slim
    else:
        src = done[_key("search", m, None, s if m == "aows" else None, seed)]
        sws = [Switch.parse(x) for x in src["switches"]]
    weights = list(WEIGHT_SETTINGS[s]) if v == "W" else None
    return {"switches": [str(x) for x in sws], "accuracy": run.retrain(sws, weights, seed, lr)}


def _write_reports(c, run, done) -> dict:
    out = c["out"]
    rows = []
    for seed in c["seeds"]:
        for s in c["settings"]:
            mu = WEIGHT_SETTINGS[s]
            for m in c["methods"]:
                for v in c["variants"]:
                    key = _key("retrain", m, v, s if (v == "W" or m == "aows") else None, seed)
                    rec = done[key]
                    acc = rec["accuracy"]
                    rows.append({"seed": seed, "setting": s, "method": f"{_METHOD_NAMES[m]}-{v}",
                                 "weighted_top1": 100 * float(np.dot(mu, acc)),
                                 "top1": [100 * a for a in acc], "switches": rec["switches"]})
    summary = []
    for s in c["settings"]:
        for m in c["methods"]:
            for v in c["variants"]:
                name = f"{_METHOD_NAMES[m]}-{v}"
                vals = [r["weighted_top1"] for r in rows if r["setting"] == s and r["method"] == name]
                summary.append({"setting": s, "method": name, "mean": float(np.mean(vals)),
                                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)})
    # found configurations: MACs by slimkern.profile, percentage of budget
    found = []
    for key, rec in sorted(done.items()):
        if not key.startswith("search") and not key.startswith("retrain-slim"):
            continue
        if key.startswith("retrain-slim") and "-U-" not in key:
            continue
        for i, sw in enumerate(rec["switches"]):
            macs = run.macs_cached(Switch.parse(sw))
            found.append({"job": key, "platform": f"#{i + 1}", "switch": sw, "macs": macs,
                          "budget": run.budgets[i], "budget_percent": 100 * macs / run.budgets[i]})
    _atomic_json(os.path.join(out, "found.json"), {"full_macs": run.full_macs, "configurations": found,
                                                     "groups": list(run.space.groups)})
    _atomic_json(os.path.join(out, "table2.json"), {"summary": summary, "rows": rows})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "method", "mean_weighted_top1", "std", "n_seeds"])
    for r in summary:
        w.writerow([r["setting"], r["method"], f"{r['mean']:.2f}", f"{r['std']:.2f}", r["n"]])
    atomic_write_text(os.path.join(out, "table2.csv"), buf.getvalue())
    try:
        _plot_channels(c, run, done, os.path.join(out, "channels.png"))
    except Exception as e:  # a plot never fails a finished run
        log.warning("channels plot skipped: %s", e)
    return {"summary": summary, "rows": rows}


def _plot_channels(c, run, done, path):
    """Channels per layer of platforms #6 and #7 (first seed's OWS / AOWS searches) against uniform scaling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = run.space
    seed = c["seeds"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, i in zip(axes, (5, 6)):
        uni = run.slim[i]
        ax.plot([sp.uniform_channels(uni.total_width)[g] for g in sp.groups], "k--", label=f"uniform {uni}")
        for key, rec in sorted(done.items()):
            if key.startswith("search") and key.endswith(f"seed{seed}"):
                sw = Switch.parse(rec["switches"][i])
                ch = {g: rs[0][1] for g, rs in sw._channels}
                ax.plot([ch[g] for g in sp.groups], marker="o", ms=3, label=key[len("search-"):-len(f"-seed{seed}")])
        ax.set_title(f"platform #{i + 1} ({c['budgets'][i]:g}x MACs)")
        ax.set_xticks(range(sp.num_layers))
        ax.set_xticklabels(sp.groups, rotation=90, fontsize=7)
        ax.set_ylabel("channels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def format_table(summary: list[dict]) -> str:
    """The summary as a Markdown table: settings as rows, methods as columns (mean ± std)."""
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cell = {(r["setting"], r["method"]): r for r in summary}
    lines = ["| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for s in settings:
        vals = [cell[(s, m)] for m in methods]
        best = max(v["mean"] for v in vals)
        parts = [(f"**{v['mean']:.2f}** ± {v['std']:.2f}" if math.isclose(v["mean"], best) else
                  f"{v['mean']:.2f} ± {v['std']:.2f}") for v in vals]
        lines.append(f"| {s} | " + " | ".join(parts) + " |")
    return "\n".join(lines)
