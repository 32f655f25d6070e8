"""``slimkern fl`` and the federated ``slimkern demo`` (hooked into ``slimkern/cli.py``).

    slimkern fl --strategy paradis --clients 20 --tiers "1.0:0.3,0.5:0.4,[0.5,0.5]:0.3" \\
                --partition dirichlet --alpha 0.5 --rounds 20 --out runs/fl
    slimkern fl --tiers "full=1.0:0.3,phone={macs=150k}:0.4,pair={macs=150k,devices=2}:0.3" ...
                             # tiers as device budgets: each one's switch chosen on the profile
    slimkern demo            # federated demo: paradis vs heterofl vs small-model-only fedavg
    slimkern demo paradis    # the centralised ParaDiS demo

``--strategy`` takes several names to compare them on the same clients. Every flag can also
be a key of a ``--config`` YAML/JSON file; flags on the command line win. The run folder
gets config.json, log.txt, report.json/csv, history.json, fl_accuracy.png and a checkpoint
per strategy (``--resume`` continues them). Any error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from slimkern.fl.demo import DEMO_FL

__all__ = ["add_fl_parser", "cmd_fl", "run_demo", "main"]

_HELP = {
    "tiers": "tiers as 'switch:fraction,...', optionally 'name=switch:fraction' "
             "(e.g. '1.0:0.3,0.5:0.4,[0.5,0.5]:0.3'), or as device budgets in braces whose switch is "
             "chosen on the model's profile: 'phone={macs=2M,devices=2}:0.3' (keys macs, params, "
             "memory = parameter + peak activation bytes, devices; suffixes k/M/G, memory also "
             "KB/MB/GB/KiB/MiB/GiB); both forms mix",
    "strategies": "paradis, heterofl, fedavg, fedrolex, fjord, clustered, otfusion (several to compare); "
                  "dwnp alone (device-wise pruning with a hypernetwork; its defaults differ: slimkern.fl.dwnp.DWNP_FL)",
    "clients": "number of clients", "partition": "iid, dirichlet or shards",
    "alpha": "Dirichlet concentration (label skew; smaller = more skewed)",
    "classes_per_client": "shards: classes per client",
    "rounds": "federated rounds", "local_epochs": "local epochs per round",
    "clients_per_round": "clients picked per round (0: all)", "lr": "client SGD learning rate",
    "lr_schedule": "constant or cosine (over rounds)", "batch_size": "client batch size",
    "channels": "SmallCNN channels of the 1.0x net",
    "aug_rotate": "client-side augmentation: max rotation in degrees (0: off)",
    "aug_translate": "client-side augmentation: max shift in pixels", "aug_scale": "client-side augmentation: "
    "max relative scaling", "calib_fraction": "share of the training split kept "
    "on the server for BN calibration", "calib_batches": "BN calibration batches",
    "server_distill": "server step after each aggregation: none or feddf (FedDF ensemble distillation on "
                      "the server split: 60%% unlabeled, 40%% validation; slimkern.fl.feddf)",
    "distill_steps": "FedDF server steps per round (at most; early stopping)",
    "eval_every": "evaluate every N rounds (and after the last)", "seed": "seed", "threads": "torch CPU threads",
    "out": "run folder (with --engine flower: the Flower app folder to write)",
    "label_split": "heterofl/fedrolex: label split (mask absent classes' logits locally, send only held "
                   "classifier rows)",
    "scaler": "heterofl/fedrolex: HeteroFL's Scaler (hidden outputs divided by the rate in local training)",
    "clip_norm": "heterofl/fedrolex: local gradient-norm clipping (0: off)",
    "dynamic": "heterofl/fedrolex: re-draw every client's width each round",
    "fjord_bn": "fjord: 'server' (BN statistics recalibrated on server data) or 'travel' (per-width "
                "statistics travel and are averaged)",
    "fjord_kd": "fjord: self-distillation from p_max in every local step",
    "engine": "simulate (in process) or flower (write a Flower app to --out; see docs/flower.md)",
    "batch_clients": "train the clients of a switch together, one batched pass per local step "
                     "(slimkern.fl.batched; equal to one by one to float rounding); where that cannot be "
                     "exact (custom rule hooks, travelling BN statistics, ...) they train one by one and "
                     "the log says why",
    "p_server": "dwnp: the server model's FLOPs ratio target (0: the largest device target)",
    "p_devices": "dwnp: device FLOPs ratio targets, one for all or one per client (default: from each "
                 "client's tier: [w] -> MACs at [w] / MACs at [1.0], {macs=M} -> M / MACs at [1.0])",
    "lr_hn": "dwnp: Adam learning rate of the mask hypernetwork (dwnp's default: 0.01)",
    "lam": "dwnp: lambda of eq. 4 (FLOPs term)",
    "regularizer": "dwnp: R of eq. 4, abs_log |log(T/T*)| or sq_log (log(T/T*))^2",
    "project": "dwnp: project a learned mask off its target by more than 5%% onto the target",
}


_CHOICES = {"engine": ("simulate", "flower"), "fjord_bn": ("server", "travel"), "regularizer": ("abs_log", "sq_log")}


def _add_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON file whose keys mirror these flags")
    for key, default in DEMO_FL.items():
        shown = defaults.get(key, default)
        flag = "--strategy" if key == "strategies" else "--" + key.replace("_", "-")
        h = f"{_HELP.get(key, '')} (default: {shown!r})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        elif key in _CHOICES:
            p.add_argument(flag, dest=key, choices=_CHOICES[key], default=argparse.SUPPRESS, help=h)
        elif isinstance(default, list):
            p.add_argument(flag, dest=key, nargs="+", default=argparse.SUPPRESS, help=h,
                           type=int if key == "channels" else str)
        else:
            p.add_argument(flag, dest=key, type=type(default), default=argparse.SUPPRESS, help=h)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def add_fl_parser(sub) -> argparse.ArgumentParser:
    """Adds ``fl`` to an ``argparse`` subparsers object (``slimkern/cli.py`` calls this)."""
    p = sub.add_parser("fl", help="federated training across heterogeneous devices (simulation)")
    _add_options(p, {"out": "runs/fl"})

    def one_line_error(message: str):  # argparse prints the usage too; one line says it
        print(f"slimkern fl: error: {' '.join(str(message).split())} (see slimkern fl --help)", file=sys.stderr)
        sys.exit(2)

    p.error = one_line_error
    parse_known = p.parse_known_args

    def strict(args=None, namespace=None):  # unknown flags: this parser's one line, not the top level's usage
        ns, extra = parse_known(args, namespace)
        if extra:
            one_line_error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, extra

    p.parse_known_args = strict
    return p


def _load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config {path!r} must be a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    if "strategy" in data:
        data["strategies"] = data.pop("strategy")
    unknown = sorted(set(data) - set(DEMO_FL))
    if unknown:
        raise ValueError(f"config {path!r}: unknown keys {unknown}; known: {sorted(DEMO_FL)}")
    if isinstance(data.get("strategies"), str):
        data["strategies"] = [data["strategies"]]
    return data


def given(args: argparse.Namespace, preset: dict | None = None) -> dict:
    """The options the user gave (preset, then the config file, then the flags)."""
    cfg = dict(preset or {})
    if getattr(args, "config", None):
        cfg.update(_load_config(args.config))
    cfg.update({k: v for k, v in vars(args).items() if k in DEMO_FL})
    return cfg


def resolve(args: argparse.Namespace, preset: dict | None = None) -> dict:
    return {**DEMO_FL, **given(args, preset)}


def _run(cfg: dict, args, preset: dict | None = None) -> int:
    from slimkern.fl.demo import run_fl_demo
    from slimkern.fl.strategy import STRATEGIES

    if "dwnp" in cfg["strategies"]:  # not a rule of the round object: its own loop (slimkern.fl.dwnp)
        from slimkern.fl.dwnp import run_fl_dwnp
        rep = run_fl_dwnp(given(args, preset), progress=getattr(args, "progress", True),
                          resume=getattr(args, "resume", False))
        out = rep["meta"]["config"]["out"]
        print(f"report: {os.path.join(out, 'report.json')}  plot: {os.path.join(out, 'dwnp.png')}")
        return 0

    bad = [s for s in cfg["strategies"] if s not in STRATEGIES]
    if bad:
        print(f"slimkern fl: unknown strategy {bad}; choose from {sorted(STRATEGIES)}", file=sys.stderr)
        return 2
    if cfg.get("engine", "simulate") == "flower":
        return _write_flower_app(cfg, args)
    report = run_fl_demo(cfg, progress=getattr(args, "progress", True), resume=getattr(args, "resume", False))
    print(f"report: {os.path.join(cfg['out'], 'report.json')}  plot: {os.path.join(cfg['out'], 'fl_accuracy.png')}")
    return 0


def _write_flower_app(cfg: dict, args) -> int:
    """``--engine flower``: the experiment as a runnable Flower app in ``--out``."""
    from slimkern.fl.flower.generate import config_from_cli, write_app
    if len(cfg["strategies"]) != 1:
        raise ValueError(f"--engine flower runs one strategy, got {cfg['strategies']}")
    if cfg.get("server_distill", "none") != "none":
        raise ValueError("--engine flower does not run --server-distill yet (its server step is not in the app)")
    write_app(cfg["out"], config_from_cli(cfg))
    print(f"Flower app: {cfg['out']} (pyproject.toml, slimkern_app/); run it as its README.md says, "
          "several machines with TLS: docs/flower.md")
    return 0


def _one_line(exc: BaseException) -> str:
    """An error as one line: the message for the errors a user causes (bad option, file
    not found), the exception type too for anything else."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        msg = repr(exc.args[0])
    if isinstance(exc, (ValueError, FileNotFoundError)) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _guarded(command: str, cfg_preset: dict, args) -> int:
    """Runs the command; every error is one line on stderr and exit code 2, never a
    traceback (Ctrl-C still stops the run)."""
    try:
        cfg = resolve(args, cfg_preset)
        return _run(cfg, args, cfg_preset)
    except Exception as exc:  # noqa: BLE001 - the command line reports, it does not crash
        print(f"slimkern {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def cmd_fl(args) -> int:
    return _guarded("fl", {"out": "runs/fl"}, args)


def run_demo(args) -> int:
    """The federated demo (``slimkern demo`` without ``paradis``)."""
    return cmd_fl_demo(args)


def cmd_fl_demo(args) -> int:
    return _guarded("demo", {}, args)


def main(argv=None) -> int:
    """Standalone entry: ``python -m slimkern.fl.cli [fl|demo] ...``."""
    parser = argparse.ArgumentParser(prog="slimkern")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fl_parser(sub)
    _add_options(sub.add_parser("demo", help="federated demo on digits"), {})
    args = parser.parse_args(argv)
    return cmd_fl(args) if args.command == "fl" else cmd_fl_demo(args)


if __name__ == "__main__":
    sys.exit(main())
