"""The federated demo (``slimkern demo``): heterogeneous devices train one ParaDiS network.

Digits (scikit-learn's bundled 8x8 handwritten digits: real data, no download). 20 clients
with Dirichlet(0.5) label skew in three tiers: a full device (``[1.0]``, 30%), a small
device (``[0.5]``, 40%) and a household of two small devices (``[0.5, 0.5]``, 30%). Three
strategies on the same clients and seed:

* ``paradis``  -- every tier trains what it can run; the two-device tier trains the ParaDiS
  switch ``[0.5, 0.5]`` over its two devices; clients also train the smaller tier switches
  their devices can run, distilled in place (``ParaDiSFL(nested=True)``);
* ``heterofl`` -- prefix widths only: the two-device tier can only use ``[0.5]``;
* ``fedavg``   -- small-model-only FedAvg: everyone trains ``[0.5]`` (what all can run).

Every strategy gets the same model, data, rounds, local epochs, learning rate and client
augmentation. The model (``SmallCNN`` with channels 32-64-12) ends in a narrow last conv:
the classifier sees 12 pooled features at ``[1.0]`` but only 6 at ``[0.5]``; with the
standard random rotation / shift / scaling augmentation of the clients' digits
(``RandomAffine(10 deg, 1 px, 10%)``) that bottleneck leaves the 0.5x network visibly
short of capacity. On plain 8x8 digits with a wide last layer, a half-width CNN already
saturates (~96-98%) and nothing can show that the full device's extra width pays off.

A tenth of the training split stays on the server for BN calibration (BN statistics never
travel). The run folder gets ``config.json``, ``log.txt``, ``report.json`` (per strategy
and tier: tier name, switch, top-1, bytes), ``report.csv``, ``history.json`` and
``fl_accuracy.png`` (accuracy vs round per tier; bytes per tier).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time

import numpy as np
import torch

__all__ = ["DEMO_FL", "run_fl_demo", "load_digits_split", "rule_args", "rule_from_cfg"]

DEMO_FL: dict = {
    "tiers": "full device=1.0:0.3,small device=0.5:0.4,two small devices=[0.5,0.5]:0.3",
    "strategies": ["paradis", "heterofl", "fedavg"],
    "clients": 20, "partition": "dirichlet", "alpha": 0.5, "classes_per_client": 2, "rounds": 20, "local_epochs": 5,
    "clients_per_round": 0, "lr": 0.2, "lr_schedule": "cosine", "batch_size": 16,
    "channels": [32, 64, 12], "aug_rotate": 10.0, "aug_translate": 1.0, "aug_scale": 0.1,
    "calib_fraction": 0.1, "calib_batches": 8, "eval_every": 5,
    "seed": 0, "threads": 1, "out": "runs/demo-fl",
    "server_distill": "none", "distill_steps": 200,
    # rule options (slimkern.fl.heterofl_local for heterofl/fedrolex, slimkern.fl.fjord_bn for fjord)
    "label_split": True, "scaler": True, "clip_norm": 1.0, "dynamic": False, "fjord_bn": "server", "fjord_kd": False,
    "engine": "simulate",
    # DWNP options (slimkern fl --strategy dwnp; slimkern.fl.dwnp): FLOPs targets (p_devices empty: from the
    # tiers; p_server 0: the largest device target), hypernetwork Adam lr, lambda of eq. 4, R, mask projection
    "p_server": 0.0, "p_devices": [], "lr_hn": 1e-3, "lam": 2.0, "regularizer": "abs_log", "project": True,
    "batch_clients": True,  # clients of a switch train batched (slimkern.fl.batched) where that is exact
}


def rule_args(name: str, cfg: dict) -> dict:
    """The constructor arguments of rule ``name`` that ``cfg``'s rule options set: HeteroFL's
    local recipe for ``heterofl`` / ``fedrolex`` (``clip_norm`` 0 = off), FjORD's BN and
    self-distillation for ``fjord``; ``{}`` for the other rules."""
    if name in ("heterofl", "fedrolex"):
        return {"label_split": bool(cfg["label_split"]), "scaler": bool(cfg["scaler"]),
                "clip_norm": float(cfg["clip_norm"]) or None, "dynamic": bool(cfg["dynamic"])}
    if name == "fjord":
        return {"bn": cfg["fjord_bn"], "kd": bool(cfg["fjord_kd"])}
    return {}


def rule_from_cfg(name: str, cfg: dict):
    """Rule ``name`` with ``rule_args(name, cfg)``."""
    from slimkern.fl.rules import RULES, get_rule
    get_rule(name)  # an unknown name: the registry's message
    return RULES[name](**rule_args(name, cfg))


def load_digits_split(seed: int = 0, calib_fraction: float = 0.1):
    """(train, calib, test) tensor pairs of 8x8 one-channel digits; calib is a stratified
    server-side split of the training data."""
    try:
        from slimkern.data import digits
        split = digits(image_size=8, channels=1, seed=seed)
        Xtr, Ytr = split.train.tensors
        Xte, Yte = split.test.tensors
    except ImportError:  # slimkern.data absent: the same preprocessing written out
        from sklearn.datasets import load_digits
        raw = load_digits()
        X = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)
        Y = torch.from_numpy(raw.target.astype(np.int64))
        perm = np.random.default_rng(seed).permutation(len(Y))
        n_test = len(Y) // 4
        te, tr = torch.from_numpy(perm[:n_test]), torch.from_numpy(perm[n_test:])
        mean, std = X[tr].mean(), X[tr].std()
        X = (X - mean) / std
        Xtr, Ytr, Xte, Yte = X[tr], Y[tr], X[te], Y[te]
    rng = np.random.default_rng([seed, 11])
    calib = []
    for c in np.unique(Ytr.numpy()):
        idx = np.flatnonzero(Ytr.numpy() == c)
        calib.append(rng.permutation(idx)[:int(round(calib_fraction * len(idx)))])
    calib = np.sort(np.concatenate(calib))
    keep = np.setdiff1d(np.arange(len(Ytr)), calib)
    return (Xtr[keep], Ytr[keep]), (Xtr[calib], Ytr[calib]), (Xte, Yte)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"paradis": "-", "heterofl": "--", "fedavg": ":", "fedrolex": "-.", "fjord": "-.", "clustered": "-."}
    tiers = []
    for strat, res in results.items():
        for t in res["tiers"]:
            if t["tier"] not in tiers:
                tiers.append(t["tier"])
    colors = {t: f"C{i}" for i, t in enumerate(tiers)}
    for strat, res in results.items():
        rounds = [r for r in res["history"]["rounds"] if r["tier_accuracy"]]
        for t in res["tiers"]:
            xs = [r["round"] + 1 for r in rounds]
            ys = [100 * r["tier_accuracy"][t["tier"]] for r in rounds]
            ax.plot(xs, ys, styles.get(strat, "-"), color=colors[t["tier"]], marker="o", ms=3,
                    label=f"{strat}: {t['tier']} {t['switch']}")
    ax.set_xlabel("round")
    ax.set_ylabel("top-1 on digits test (%)")
    ax.set_title("accuracy vs round (per tier)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    width = 0.8 / max(1, len(results))
    for i, (strat, res) in enumerate(results.items()):
        xs = np.arange(len(tiers)) + i * width
        by = {t["tier"]: (t["bytes_down"] + t["bytes_up"]) / 2 ** 20 for t in res["tiers"]}
        bx.bar(xs, [by.get(t, 0) for t in tiers], width, label=strat)
    bx.set_xticks(np.arange(len(tiers)) + width * (len(results) - 1) / 2)
    bx.set_xticklabels(tiers, fontsize=8)
    bx.set_ylabel("MiB sent (down + up, whole run)")
    bx.set_title("communication per tier")
    bx.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_fl_demo(cfg: dict | None = None, progress: bool = True, console=None, resume: bool = False) -> dict:
    """Runs the demo with ``DEMO_FL`` overridden by ``cfg``; returns the report dict."""
    from slimkern.fl.models import small_cnn
    from slimkern.fl.simulate import make_clients, parse_tiers, simulate

    cfg = {**DEMO_FL, **(cfg or {})}
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    _atomic_write(os.path.join(out, "config.json"), json.dumps(cfg, indent=2))
    log_lines: list[str] = []
    logger = logging.getLogger("slimkern.fl.demo")

    def log(msg: str) -> None:
        log_lines.append(msg)
        logger.info(msg)

    t_start = time.perf_counter()
    train, calib, test = load_digits_split(cfg["seed"], cfg["calib_fraction"])
    tiers = parse_tiers(cfg["tiers"])
    clients = make_clients(train[1].numpy(), tiers, cfg["clients"], cfg["partition"], alpha=cfg["alpha"],
                           classes_per_client=cfg["classes_per_client"],
                           seed=cfg["seed"])
    log(f"digits: {len(train[1])} client samples, {len(calib[1])} server calibration, {len(test[1])} test; "
        f"{len(clients)} clients: " + ", ".join(f"{t.name} {t.switch if t.switch is not None else t.budget} "
                                                 f"x{sum(c.tier == t.name for c in clients)}"
                                                 for t in tiers))
    augment = None
    if cfg["aug_rotate"] or cfg["aug_translate"] or cfg["aug_scale"]:
        from slimkern.fl.augment import RandomAffine
        # the blank background of the standardised images (raw pixel 0) fills shifted-in borders
        augment = RandomAffine(cfg["aug_rotate"], cfg["aug_translate"], cfg["aug_scale"], fill=float(train[0].min()))
    results: dict[str, dict] = {}
    if cfg["server_distill"] not in ("none", "feddf"):
        raise ValueError(f"server_distill must be 'none' or 'feddf', got {cfg['server_distill']!r}")
    for strat in cfg["strategies"]:
        t0 = time.perf_counter()
        server_step = None
        if cfg["server_distill"] == "feddf":  # FedDF after every aggregation (slimkern.fl.feddf)
            from slimkern.fl.feddf import FedDF
            n_unl = (len(calib[0]) * 3) // 5  # the server split: 60% unlabeled (augmented), 40% validation
            server_step = FedDF(calib[0][:n_unl], (calib[0][n_unl:], calib[1][n_unl:]), steps=cfg["distill_steps"],
                                augment=augment, calibrate="both", seed=cfg["seed"])
        net = small_cnn(10, 1, tuple(cfg["channels"]), seed=cfg["seed"])
        hist = simulate(net, train, test, clients, rule_from_cfg(strat, cfg), rounds=cfg["rounds"],
                        local_epochs=cfg["local_epochs"],
                        lr=cfg["lr"], batch_size=cfg["batch_size"], clients_per_round=cfg["clients_per_round"] or None,
                        seed=cfg["seed"], progress=progress, calib_set=calib, lr_schedule=cfg["lr_schedule"],
                        eval_every=cfg["eval_every"], calib_batches=cfg["calib_batches"], augment=augment,
                        checkpoint=os.path.join(out, f"checkpoint-{strat}.pt"), resume=resume,
                        server_step=server_step, client_batching=bool(cfg.get("batch_clients", False)),
                        log=lambda m, s=strat: log(f"[{s}] {m}"))
        acc = hist.last_accuracy()
        nbytes = hist.total_bytes()
        tier_rows = [{"tier": t.name, "switch": hist.tiers[t.name], "top1": acc[t.name],
                      "bytes": nbytes.get(t.name, {}).get("down", 0) + nbytes.get(t.name, {}).get("up", 0),
                      "bytes_down": nbytes.get(t.name, {}).get("down", 0),
                      "bytes_up": nbytes.get(t.name, {}).get("up", 0)} for t in tiers]
        results[strat] = {"tiers": tier_rows, "time_s": time.perf_counter() - t0, "history": hist.to_dict()}
        log(f"[{strat}] done in {results[strat]['time_s']:.1f}s: " +
            ", ".join(f"{r['tier']} {r['switch']} {100 * r['top1']:.1f}%" for r in tier_rows))
    total = time.perf_counter() - t_start

    checks, margins = {}, {}
    for strat in ("paradis", "heterofl"):
        if strat in results:
            checks[f"{strat}: every tier >= 90%"] = all(r["top1"] >= 0.90 for r in results[strat]["tiers"])
    if "fedavg" in results:
        base = max(r["top1"] for r in results["fedavg"]["tiers"])
        for strat in ("paradis", "heterofl"):
            if strat in results:
                full = results[strat]["tiers"][0]
                checks[f"{strat}: {full['tier']} beats small-model-only fedavg"] = full["top1"] > base
                margins[f"{strat}: {full['tier']} {full['switch']} minus fedavg"] = full["top1"] - base
    report = {
        "demo": "federated ParaDiS on digits", "time_s": total, "config": cfg, "checks": checks, "margins": margins,
        "strategies": {s: r["tiers"] for s, r in results.items()},
        "strategy_time_s": {s: r["time_s"] for s, r in results.items()},
    }
    _atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=2))
    _atomic_write(os.path.join(out, "history.json"),
                  json.dumps({s: r["history"] for s, r in results.items()}, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["strategy", "tier", "switch", "top1", "bytes_down", "bytes_up"])
    for s, r in results.items():
        for t in r["tiers"]:
            w.writerow([s, t["tier"], t["switch"], f"{t['top1']:.4f}", t["bytes_down"], t["bytes_up"]])
    _atomic_write(os.path.join(out, "report.csv"), buf.getvalue())
    _plot(results, os.path.join(out, "fl_accuracy.png"))
    log(f"total {total:.1f}s; " + "; ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    _atomic_write(os.path.join(out, "log.txt"), "\n".join(log_lines) + "\n")
    print_table(report, console)
    return report


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"federated demo on digits ({report['time_s']:.0f}s)")
    for col in ("strategy", "tier", "switch", "top-1 %", "MiB down", "MiB up"):
        table.add_column(col, justify="right" if col[0] in "tM" and col != "tier" else "left")
    for s, rows in report["strategies"].items():
        for r in rows:
            table.add_row(s, r["tier"], r["switch"], f"{100 * r['top1']:.1f}",
                          f"{r['bytes_down'] / 2 ** 20:.2f}", f"{r['bytes_up'] / 2 ** 20:.2f}")
    console.print(table)
    for k, v in report["checks"].items():
        console.print(f"  {'[green]ok[/green]' if v else '[red]FAILED[/red]'}  {k}")
    for k, v in report.get("margins", {}).items():
        console.print(f"  {k}: {100 * v:+.1f} points")
