"""Run folders of ``slimkern prune dac|dwnp``: JSON report, CSV table, plots, model weights.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so a crash never leaves a half-written report. Model weights are plain ``state_dict``s (load
with ``torch.load(path, weights_only=True)``); the kept channels in the JSON rebuild the
architecture with ``prune_channels(net, keep)``.
"""
from __future__ import annotations

import csv
import io
import json
import os

from slimkern.report import atomic_write_text, save_figure
from slimkern.train.checkpoint import atomic_save

__all__ = ["dwnp_record", "write_dac_run", "write_dwnp_run", "write_gate_run", "write_sweep_run"]


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_dac_run(out: str, runs: list[dict], meta: dict) -> list[str]:
    """``runs``: one ``DACFederatedResult.summary()`` per seed (plus ``seed`` and ``models``:
    ``{name: state_dict}``). Writes report.json, clusters.csv, dac.png, models/*.pt."""
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
    rows = []
    for run in runs:
        for j, c in enumerate(run["clusters"]):
            rows.append({"seed": run["seed"], "kind": c["kind"], "budget": json.dumps(c["budget"]),
                         "clients": " ".join(map(str, c["clients"])), "macs": c["macs"], "params": c["params"],
                         "peak_activation_bytes": c["peak_activation_bytes"], "width": c["width"],
                         "accuracy": c["final_accuracy"]})
        for name, sd in run.pop("models", {}).items():
            atomic_save(sd, os.path.join(out, "models", f"seed{run['seed']}_{name}.pt"))
    atomic_write_text(os.path.join(out, "report.json"), json.dumps({"meta": meta, "runs": runs}, indent=2))
    fields = ["seed", "kind", "budget", "clients", "macs", "params", "peak_activation_bytes", "width", "accuracy"]
    atomic_write_text(os.path.join(out, "clusters.csv"), _csv(rows, fields))
    paths = [os.path.join(out, p) for p in ("report.json", "clusters.csv")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are optional
        return paths
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    full = [r["full"] for r in runs]
    for ax, key, label in zip(axes, ("params", "macs", "peak_activation_bytes"),
                              ("parameters", "MACs", "peak activation (bytes)")):
        for kind, marker in (("dac", "o"), ("width", "s")):
            pts = [(r[key], r["accuracy"]) for r in rows if r["kind"] == kind]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label="DAC" if kind == "dac" else "width multiplier")
        fl = all(f.get("fl_accuracy") for f in full)  # the 1.0x model through FedAvg, else only pre-trained
        ax.scatter([f[key] for f in full], [f["fl_accuracy"][-1] if fl else f["accuracy"] for f in full],
                   marker="*", s=90, label="1.0x (FedAvg, all clients)" if fl else "1.0x (pre-trained)")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(meta.get("title", "DAC"))
    save_figure(fig, os.path.join(out, "dac.png"), dpi=120, bbox_inches="tight")
    return paths + [os.path.join(out, "dac.png")]


def dwnp_record(result, seed: int) -> dict:
    """One seed's entry of a DWNP run folder: ``result.summary()`` (a ``DWNPResult``) with the
    seed, every participant's kept channels and ``models`` (``{"p<n>": state_dict}``, n = 0 the
    server) for ``write_dwnp_run``."""
    s = result.summary()
    s["seed"] = seed
    s["models"] = {f"p{d.index}": d.model.state_dict() for d in [result.server] + result.devices}
    s["server"]["keep"] = result.server.keep
    for d, ds in zip(result.devices, s["devices"]):
        ds["keep"] = d.keep
    return s


def write_dwnp_run(out: str, runs: list[dict], meta: dict) -> list[str]:
    """``runs``: one ``DWNPResult.summary()`` per seed (plus ``seed``, ``models``). Writes
    report.json, devices.csv (the paper's Table 1 layout per participant), dwnp.png, models/*.pt."""
    os.makedirs(os.path.join(out, "models"), exist_ok=True)
    rows = []
    for run in runs:
        for p in [run["server"]] + run["devices"]:
            rows.append({"seed": run["seed"], "participant": "server" if p["index"] == 0 else f"device {p['index']}",
                         "base_accuracy": run["base_accuracy"], "accuracy": p["accuracy"],
                         "change": (p["accuracy"] - run["base_accuracy"]) if run["base_accuracy"] is not None else None,
                         "target_ratio": p["target"], "learned_ratio": p["learned_ratio"], "flops_ratio": p["ratio"],
                         "flops_reduction": 1 - p["ratio"], "macs": p["macs"], "params": p["params"]})
        for name, sd in run.pop("models", {}).items():
            atomic_save(sd, os.path.join(out, "models", f"seed{run['seed']}_{name}.pt"))
    atomic_write_text(os.path.join(out, "report.json"), json.dumps({"meta": meta, "runs": runs}, indent=2))
    fields = ["seed", "participant", "base_accuracy", "accuracy", "change", "target_ratio", "learned_ratio",
              "flops_ratio", "flops_reduction", "macs", "params"]
    atomic_write_text(os.path.join(out, "devices.csv"), _csv(rows, fields))
    paths = [os.path.join(out, p) for p in ("report.json", "devices.csv")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(dict.fromkeys(r["participant"] for r in rows))
    for k, name in enumerate(names):
        pr = [r for r in rows if r["participant"] == name]
        axes[0].scatter([k] * len(pr), [r["accuracy"] for r in pr], color="C0")
        axes[1].scatter([k] * len(pr), [r["flops_ratio"] for r in pr], color="C0", label="final" if k == 0 else None)
        axes[1].scatter([k] * len(pr), [r["learned_ratio"] for r in pr], color="C2", marker="x",
                        label="learned" if k == 0 else None)
        axes[1].scatter([k], [pr[0]["target_ratio"]], color="C3", marker="_", s=400, label="target" if k == 0 else None)
    base = [r["base_accuracy"] for r in runs if r["base_accuracy"] is not None]
    for b in base:
        axes[0].axhline(b, color="C1", alpha=0.5, lw=1)
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (line: unpruned FedAvg)")
    axes[1].set_ylabel("FLOPs ratio")
    axes[1].legend(fontsize=8)
    fig.suptitle(meta.get("title", "DWNP"))
    save_figure(fig, os.path.join(out, "dwnp.png"), dpi=120, bbox_inches="tight")
    return paths + [os.path.join(out, "dwnp.png")]


def write_sweep_run(out: str, runs: list[dict], meta: dict) -> list[str]:
    """``runs``: one ``dac_client_sweep`` result per seed. Writes report.json, sweep.csv (one row
    per seed, scenario, number of clients and model) and sweep.png: per scenario, accuracy vs
    params at each number of clients (Figure 4 analogue, top) and accuracy vs number of clients
    per model (Figure 5 analogue, bottom), mean over seeds with the seed spread as error bars."""
    os.makedirs(out, exist_ok=True)
    rows = [{**r, "budget": json.dumps(r["budget"]) if r["budget"] else "", "members": " ".join(map(str, r["members"]))}
            for run in runs for r in run["rows"]]
    atomic_write_text(os.path.join(out, "report.json"), json.dumps({"meta": meta, "runs": runs}, indent=2))
    fields = ["seed", "scenario", "partition", "local_epochs", "clients", "classes_per_client", "model", "budget",
              "members", "macs", "params", "peak_activation_bytes", "accuracy"]
    atomic_write_text(os.path.join(out, "sweep.csv"), _csv(rows, fields))
    paths = [os.path.join(out, p) for p in ("report.json", "sweep.csv")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:  # pragma: no cover
        return paths
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    clients = sorted({r["clients"] for r in rows})
    models = list(dict.fromkeys((r["model"], r["budget"]) for r in rows))
    fig, axes = plt.subplots(2, len(scen), figsize=(4.6 * len(scen), 7.4), squeeze=False)
    for j, sc in enumerate(scen):
        sr = [r for r in rows if r["scenario"] == sc]
        for i, n in enumerate(clients):
            pts = []
            for m in models:
                acc = [r["accuracy"] for r in sr if r["clients"] == n and (r["model"], r["budget"]) == m]
                par = [r["params"] for r in sr if r["clients"] == n and (r["model"], r["budget"]) == m]
                if acc:
                    pts.append((np.mean(par), np.mean(acc), np.std(acc, ddof=1) if len(acc) > 1 else 0.0))
            pts.sort()
            if pts:
                x, y, e = zip(*pts)
                axes[0, j].errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"N={n}", color=f"C{i}")
        axes[0, j].set_xlabel("parameters")
        axes[0, j].set_title(sc)
        for k, m in enumerate(models):
            lab = "1.0x (all clients)" if m[0] == "full" else f"{m[0].upper() if m[0] == 'dac' else m[0]} {m[1]}"
            ys = [[r["accuracy"] for r in sr if r["clients"] == n and (r["model"], r["budget"]) == m] for n in clients]
            if all(ys):
                axes[1, j].errorbar(clients, [np.mean(y) for y in ys],
                                    yerr=[np.std(y, ddof=1) if len(y) > 1 else 0.0 for y in ys], marker="os^vD"[k % 5],
                                    capsize=3, label=lab, color=f"C{k}")
        axes[1, j].set_xscale("log", base=2)
        axes[1, j].set_xticks(clients, [str(n) for n in clients])
        axes[1, j].set_xlabel("number of clients")
        for ax in axes[:, j]:
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(meta.get("title", "DAC client sweep"))
    save_figure(fig, os.path.join(out, "sweep.png"), dpi=120, bbox_inches="tight")
    return paths + [os.path.join(out, "sweep.png")]


def write_gate_run(out: str, runs: list[dict], meta: dict) -> list[str]:
    """``runs``: one ``dac_gate_study`` result per seed. Writes report.json, gates.csv (one row
    per seed, gate learning rate and Algorithm-1 round: live-gate min / mean / max, what removed
    how many channels) and gates.png (smallest live gate per round, with the threshold)."""
    os.makedirs(out, exist_ok=True)
    rows = [{"seed": run["seed"], "gate_lr": r["gate_lr"], **{k: h[k] for k in ("round", "budget", "by", "removed",
                                                                              "gate_min", "gate_mean", "gate_max",
                                                                              "macs", "params")}}
            for run in runs for r in run["runs"] for h in r["history"]]
    atomic_write_text(os.path.join(out, "report.json"), json.dumps({"meta": meta, "runs": runs}, indent=2))
    atomic_write_text(os.path.join(out, "gates.csv"), _csv(rows, list(rows[0]) if rows else ["seed"]))
    paths = [os.path.join(out, p) for p in ("report.json", "gates.csv")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return paths
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lrs = list(dict.fromkeys(r["gate_lr"] for r in rows))
    for k, g in enumerate(lrs):
        for s in dict.fromkeys(r["seed"] for r in rows):
            pr = [r for r in rows if r["gate_lr"] == g and r["seed"] == s]
            ax.plot([r["round"] for r in pr], [r["gate_min"] for r in pr], color=f"C{k}", alpha=0.8,
                    label=f"gate lr {g:g}" if s == rows[0]["seed"] else None)
    thr = meta.get("threshold", 0.1)
    ax.axhline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:g}")
    ax.set_xlabel("Algorithm 1 round")
    ax.set_ylabel("smallest live gate before removal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(meta.get("title", "DAC gates"), fontsize=9)
    save_figure(fig, os.path.join(out, "gates.png"), dpi=120, bbox_inches="tight")
    return paths + [os.path.join(out, "gates.png")]
