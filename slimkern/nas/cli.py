"""``slimkern search ows|aows`` and ``slimkern demo nas``.

::

    slimkern search ows  [--config nas.yaml] [--seeds 0 1 2] [--settings S RS U] [--out runs/ows] ...
    slimkern search aows [--config nas.yaml] ...
    slimkern search latency [--timings 500 --validation 150 --regularize 0 1 100 --out runs/nas-latency]
    slimkern demo nas    [--out runs/demo-nas]

``search <method>`` runs the search phase of OWS or AOWS on digits, the per-platform Viterbi
search, the retraining of the found configurations and of the Slim baselines (``-U``/``-W``),
and writes the run folder of :mod:`slimkern.nas.experiment` (``found.json``, ``table2.json``,
``table2.csv``, ``channels.png``). ``demo nas`` runs Slim, OWS and AOWS on a small setting.
Every option is also a key of the ``--config`` file (YAML or TOML); flags win over the file.
"""
from __future__ import annotations

import argparse
import os

from slimkern.config import load_config, merge

_HELP = {
    "image_size": "digits image side in pixels", "channels": "image channels",
    "model": "a chain net of slimkern.models (mobilenet_v1)", "width_mult": "scales the 1.0x channel counts",
    "max_width": "widest choice (AOWS: 1.5)", "divisor": "channel choices are multiples of it",
    "fractions": "width levels per layer (AOWS: linspace(0.2, 1.5, 14))",
    "budgets": "seven platform budgets as fractions of the 1.0x net's MACs",
    "settings": "weight settings of Table 1 (S RS U M L RL)", "methods": "slim, ows, aows",
    "variants": "U (uniform sampling) and/or W (by platform weight) in retraining", "seeds": "training seeds",
    "search_epochs": "epochs of the search phase", "warmup": "AOWS warm-up epochs (uniform sampling)",
    "retrain_epochs": "epochs of each retraining", "window": "moving-average window of the unary statistics",
    "attribution": "aows ((loss_rand - loss_max)/L) or loss (loss_rand/L)",
    "calibrate_batches": "BN calibration batches per configuration",
    "clip_grad_norm": "clip each step's gradient norm (0: off); a diverged job reruns at half the lr", "threads": "torch CPU threads",
    "out": "run folder (finished jobs are kept and skipped on a rerun)", "progress": "progress bar",
    "timings": "latency: configurations timed per training set (biased and uniform)",
    "validation": "latency: uniform held-out configurations (timed twice: the noise floor)",
    "repeats": "latency: runs per configuration", "timing_warmup": "latency: untimed runs first",
    "reduction": "latency: min or median of the runs", "regularize": "latency: AOWS monotonicity weights kappa",
}


def _add_options(p: argparse.ArgumentParser, defaults: dict, config: bool = True) -> None:
    if config:
        p.add_argument("--config", default=argparse.SUPPRESS, help="YAML/TOML file whose keys mirror these flags")
    for key, default in defaults.items():
        if key == "dataset":
            continue
        flag = "--" + key.replace("_", "-")
        h = f"{_HELP.get(key, '')} (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        elif isinstance(default, list):
            kind = int if key == "seeds" else float if key in ("fractions", "budgets", "regularize") else str
            p.add_argument(flag, nargs="+", type=kind, default=argparse.SUPPRESS, help=h)
        else:
            p.add_argument(flag, type=type(default), default=argparse.SUPPRESS, help=h)


def add_search_parser(sub) -> None:
    """Adds ``search`` to the ``slimkern`` subcommands."""
    from slimkern.nas.experiment import DEFAULTS

    ps = sub.add_parser("search", help="multi-platform width search (OWS / AOWS) with retraining and the "
                                       "Table-2 report")
    ps.add_argument("method", choices=["ows", "aows", "latency"],
                    help="ows: uniform sampling; aows: smoothed-Viterbi sampling; latency: fit and check latency "
                         "models on this machine (slimkern.nas.latency_experiment)")
    _add_options(ps, DEFAULTS)
    from slimkern.nas.latency_experiment import LATENCY_DEFAULTS
    _add_options(ps, {k: v for k, v in LATENCY_DEFAULTS.items() if k not in DEFAULTS}, config=False)


def resolve(args: argparse.Namespace, preset: dict) -> dict:
    given = {k: v for k, v in vars(args).items() if k in preset}
    config, source = {}, "config"
    if getattr(args, "config", None):
        config, source = load_config(args.config), f"config {args.config!r}"
    return merge(preset, config, given, source)


def _finish(cfg: dict, result: dict) -> int:
    from slimkern.nas.experiment import format_table

    print(format_table(result["summary"]))
    print(f"weighted top-1 (%) over {len(cfg['seeds'])} seed(s), mean ± std; run folder: "
          f"{os.path.abspath(cfg['out'])}")
    return 0


def cmd_search(args) -> int:
    from slimkern.nas.experiment import DEFAULTS, run_experiment

    if args.method == "latency":
        from slimkern.nas.latency_experiment import LATENCY_DEFAULTS, run_latency_experiment
        from slimkern.nas.latency_experiment import latency_summary

        cfg = resolve(args, LATENCY_DEFAULTS)
        print(latency_summary(run_latency_experiment(cfg)))
        print(f"run folder: {os.path.abspath(cfg['out'])}")
        return 0

    cfg = resolve(args, dict(DEFAULTS, methods=["slim", args.method], out=f"runs/{args.method}"))
    return _finish(cfg, run_experiment(cfg))


def cmd_demo(args) -> int:
    from slimkern.nas.experiment import DEMO, run_experiment

    cfg = dict(DEMO)
    out = getattr(args, "out", None)
    if out:
        cfg["out"] = out
    return _finish(cfg, run_experiment(cfg))
