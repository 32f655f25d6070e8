"""Latency and throughput of a real ParaDiS deployment (``slimkern deploy``).

Compares, on the same net and inputs:

* ``[1.0]`` in one worker process (1 thread): the base network on one device;
* ``[0.5, 0.5]`` in two worker processes (1 thread each): the ParaDiS switch on two devices;
* the US-Nets-style one-branch width whose *total* MACs are closest to ``[0.5, 0.5]``'s
  (e.g. ``[0.71]``) in one worker: the same work on one device;
* optionally ``[4x0.25]`` in four workers;
* ``[1.0]`` in process (1 thread, no IPC): what the socket round trip costs.

Per configuration and batch size: median, p10 and p90 of the wall time of ``dep(x)`` (input
sent to every worker, partial outputs back, fused) over ``iters`` calls after ``warmup``
calls; throughput = batch / median latency (closed loop, one request in flight). Each
deployed output is checked against ``slimkern.forward_switches`` (max abs difference
recorded). Weights do not change the timings: without ``--run`` the net keeps its random
initialisation and its BN statistics are calibrated on random inputs.

Writes ``report.json``, ``latency.csv`` and ``latency.png`` into ``--out``. The machine's
load average is recorded: on a shared machine the workers compete with other processes.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

from slimkern.runfolder import experiment_main, write_csv, write_json
from slimkern.report import save_figure
from slimkern.timing import time_calls, timing_stats

DEFAULTS: dict = {
    "model": "mobilenet_v1", "width_mult": 1.0, "image_size": 32, "batch_sizes": [1, 16], "iters": 30,
    "warmup": 5, "four": False, "run": None, "seed": 0, "out": "runs/deploy",
}


def matched_width(net, sw, input_size) -> float:
    """The one-branch width (multiple of 1/64) whose total MACs are closest to ``sw``'s."""
    import slimkern

    target = slimkern.profile(net, sw, input_size).macs
    cands = [k / 64 for k in range(8, 65)]
    return min(cands, key=lambda f: abs(slimkern.profile(net, slimkern.Switch([f]), input_size).macs - target))


def _net(cfg):
    """(net, input size): a run folder's trained net, or a fresh one of ``cfg["model"]``."""
    if cfg["run"]:
        from slimkern.cli import _load_run

        _, split, net = _load_run(cfg["run"])
        return net.eval(), split.input_size
    from slimkern.models import build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        net = build(cfg["model"], num_classes=10, width_mult=cfg["width_mult"])
    return net.eval(), (1, 3, cfg["image_size"], cfg["image_size"])


def run(cfg: dict) -> dict:
    import slimkern
    from slimkern.deploy import ParallelDeployment

    cfg = {**DEFAULTS, **cfg}
    for k in ("iters", "warmup"):
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < (1 if k == "iters" else 0):
            raise ValueError(f"deploy bench: {k} must be a {'positive' if k == 'iters' else 'non-negative'} int")
    if not cfg["batch_sizes"] or any(b < 1 for b in cfg["batch_sizes"]):
        raise ValueError(f"deploy bench: batch sizes must be positive, got {cfg['batch_sizes']}")
    torch.set_num_threads(1)
    out = os.path.abspath(cfg["out"])
    os.makedirs(out, exist_ok=True)
    net, input_size = _net(cfg)
    w = matched_width(net, slimkern.Switch([0.5, 0.5]), input_size)
    configs = [("[1.0] in process", "[1.0]x", 0), ("[1.0] on 1 worker", "[1.0]x", 1),
               ("[0.5,0.5] on 2 workers", "[0.5, 0.5]x", 2), (f"US [{w:g}] on 1 worker", f"[{w}]x", 1)]
    if cfg["four"]:
        configs.append(("[4x0.25] on 4 workers", "[4x0.25]x", 4))
    sws = list(dict.fromkeys(slimkern.Switch.parse(s) for _, s, _ in configs))
    if not cfg["run"]:
        g = torch.Generator().manual_seed(cfg["seed"])
        slimkern.calibrate_bn(net, [torch.randn(16, *input_size[1:], generator=g) for _ in range(4)], sws)
    net.eval()
    rows = []
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    for name, s, workers in configs:
        sw = slimkern.Switch.parse(s)
        prof = slimkern.profile(net, sw, input_size)
        dep = slimkern.export(net, sw)
        d = ParallelDeployment(dep, threads=1) if workers else None
        try:
            for bs in cfg["batch_sizes"]:
                x = torch.randn(bs, *input_size[1:], generator=g)
                f = d if d is not None else dep
                with torch.no_grad():
                    ref = slimkern.forward_switches(net, x, [sw])[0]
                    diff = float((f(x) - ref).abs().max())
                    load = os.getloadavg()[0]
                    t = timing_stats(time_calls(f, x, warmup=cfg["warmup"], repeats=cfg["iters"]))
                med = t["median"]
                rows.append({"config": name, "switch": str(sw), "workers": workers, "batch": bs,
                             "latency_ms_median": round(1e3 * med, 3), "latency_ms_p10": round(1e3 * t["p10"], 3),
                             "latency_ms_p90": round(1e3 * t["p90"], 3), "throughput_img_s": round(bs / med, 1),
                             "macs_total": prof.macs * bs, "macs_max_device": prof.max_device_macs * bs,
                             "max_abs_diff_vs_forward_switches": diff, "load_avg_1min": round(load, 2)})
        finally:
            if d is not None:
                d.close()
    report = {"experiment": "ParaDiS parallel deployment: latency and throughput", "config": cfg,
              "input_size": list(input_size), "us_matched_width": w, "machine": platform.processor() or
              platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    write_json(os.path.join(out, "report.json"), report)
    write_csv(os.path.join(out, "latency.csv"), rows)
    plot(rows, os.path.join(out, "latency.png"))
    return report


def plot(rows: list[dict], path: str) -> None:
    """Median latency per configuration (bars, p10-p90 whiskers), one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, bs in zip(axes[0], batches):
        rs = [r for r in rows if r["batch"] == bs]
        y = [r["latency_ms_median"] for r in rs]
        err = [[r["latency_ms_median"] - r["latency_ms_p10"] for r in rs],
               [r["latency_ms_p90"] - r["latency_ms_median"] for r in rs]]
        ax.bar(range(len(rs)), y, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(rs))])
        for i, r in enumerate(rs):
            ax.annotate(f"{r['latency_ms_median']:.1f} ms\n{r['throughput_img_s']:.0f} img/s",
                        (i, r["latency_ms_median"]), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=7)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["config"] for r in rs], rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("latency per call (ms), median, p10-p90")
        ax.set_title(f"batch {bs}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("ParaDiS deployment: one worker process (1 thread) per branch", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="a `slimkern train` run folder whose trained net to deploy "
                   "(default: a randomly initialised net; timings do not depend on weights)")
    p.add_argument("--model", default=DEFAULTS["model"], help="model when no --run is given")
    p.add_argument("--width-mult", type=float, default=DEFAULTS["width_mult"])
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=DEFAULTS["batch_sizes"])
    p.add_argument("--iters", type=int, default=DEFAULTS["iters"])
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--four", action="store_true", help="also [4x0.25] on 4 workers")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--out", default=DEFAULTS["out"], help="run folder")


def table(rows: list[dict]) -> str:
    lines = [f"{'config':<26}{'batch':>6}{'median ms':>11}{'p10':>9}{'p90':>9}{'img/s':>9}{'max|diff|':>11}"]
    for r in rows:
        lines.append(f"{r['config']:<26}{r['batch']:>6}{r['latency_ms_median']:>11.2f}{r['latency_ms_p10']:>9.2f}"
                     f"{r['latency_ms_p90']:>9.2f}{r['throughput_img_s']:>9.1f}"
                     f"{r['max_abs_diff_vs_forward_switches']:>11.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return experiment_main("python -m slimkern.deploy.bench", __doc__, add_options, run,
                           lambda rep: table(rep["rows"]), argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
