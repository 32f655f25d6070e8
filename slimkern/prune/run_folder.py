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

from slimkern.report import atomic_write_text
from slimkern.train.checkpoint import atomic_save

__all__ = ["write_dac_run", "write_dwnp_run"]


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _savefig(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


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
    _savefig(fig, os.path.join(out, "dac.png"))
    plt.close(fig)
    return paths + [os.path.join(out, "dac.png")]


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
    _savefig(fig, os.path.join(out, "dwnp.png"))
    plt.close(fig)
    return paths + [os.path.join(out, "dwnp.png")]
