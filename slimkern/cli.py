"""The ``slimkern`` command line (also ``python -m slimkern``).

Subcommands::

    slimkern train  [--config run.yaml] [--model mobilenet_v1 --recipe paradis --switches "[1.2]x" ...]
    slimkern eval   --run runs/x [--switches ...]        re-evaluate a run's checkpoint
    slimkern export --run runs/x --switch "[0.5, 0.5]x"  per-device modules into the run folder
    slimkern info                                        what was built (C++/CUDA/Triton)
    slimkern demo [fl|paradis|nas]                       fl (default): federated demo (slimkern.fl.cli);
                                                         paradis: ParaDiS MobileNet-v1 on digits;
                                                         nas: Slim / OWS / AOWS width search on digits
    slimkern search ows|aows [--config nas.yaml]         multi-platform width search (slimkern.nas.cli)
    slimkern sr | scaling | deploy                       ParaDiS WDSR Figure 7, Appendix F scaling, parallel
                                                         deployment latency (slimkern.paper_cli)
    slimkern paradis baselines|ablation|figure4 [--seeds 0,1,2]   the ParaDiS paper's comparisons (slimkern.paradis.cli)
    slimkern fl     --strategy paradis --tiers "1.0:0.3,0.5:0.4,[0.5,0.5]:0.3" ...   federated simulation

Every option of ``train`` can also be a key of the ``--config`` file (YAML or TOML, dashes or
underscores); flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from slimkern.config import ConfigError, load_config, merge
from slimkern.train.collapse import TrainingCollapsed

# The ParaDiS demo: sized so training + calibration + evaluation + the individual baseline
# finish in a few minutes on a 2-core CPU (see docs/train.md for the measurements).
DEMO_PARADIS: dict = {
    "dataset": "digits", "image_size": 16, "channels": 3, "model": "mobilenet_v1", "width_mult": 0.5,
    "max_width": 1.2, "recipe": "paradis", "switches": ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"],
    "eval_switches": ["[0.5, 0.25, 0.25]x"], "individual": ["[0.5, 0.5]x"], "beta": 1.0, "kd": "wide",
    "epochs": 10, "individual_epochs": 6, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine",
    "calibrate_batches": 20, "out": "runs/demo-paradis", "export": ["[0.5, 0.5]x"], "threads": 1,
}

_HELP = {
    "dataset": "digits (bundled, default), cifar10, cifar100 or imagefolder",
    "data_root": "local folder of cifar10/cifar100/imagefolder data (never downloaded)",
    "image_size": "digits/imagefolder: image side in pixels", "channels": "digits: image channels",
    "augment": "random crop + flip on the training split (cifar/imagefolder)",
    "model": "mobilenet_v1, mobilenet_v2, resnet20 or resnet18",
    "width_mult": "scales every layer's base channels (0.25 = a quarter-size 1.0x net)",
    "max_width": "widest switch the net is built for, e.g. 1.2 for the ParaDiS wide teacher",
    "recipe": "paradis, sandwich (US-Nets) or individual",
    "switches": "switches to train, e.g. '[1.2]x' '[1.0]x' '[0.5, 0.5]x' '[4x0.25]x'",
    "eval_switches": "extra switches to calibrate and evaluate (never trained)",
    "individual": "switches to also train alone as individual baselines",
    "beta": "ParaDiS activation-distillation weight", "kd": "ParaDiS KD teacher: wide, full or none",
    "temperature": "distillation temperature", "min_width": "sandwich: min width",
    "n_random": "sandwich: random widths per step", "width_step": "sandwich: round random widths to this grid",
    "epochs": "training epochs", "batch_size": "batch size", "lr": "SGD learning rate",
    "schedule": "cosine, linear, step or constant (per iteration)", "milestones": "step schedule epochs",
    "individual_epochs": "epochs for individual baselines (0: same as --epochs)",
    "threads": "torch CPU threads (0: torch's default)",
    "keep_freed_memory": "glibc: recycle freed activation buffers instead of unmapping them "
                         "(no page faults per step; see slimkern.train.keep_freed_memory)",
    "calibrate_batches": "BN calibration batches per switch",
    "seeds": "run once per seed (e.g. 0,1,2,3,4) into <out>/seed<k> and report top-1 mean ± std per switch",
    "clip_grad_norm": "clip the global gradient norm before each step (0: off)",
    "warmup_epochs": "linear learning-rate warm-up (epochs)",
    "fail_on_collapse": "stop with an error when the teacher's loss sits at chance (ln K) for an epoch",
    "pack": "auto: one packed pass for a step's switches where packing pays, one pass per switch on "
            "nets of dense 3x3 convolutions (resnet20, resnet18); on / off force either",
    "out": "run folder", "resume": "continue from the run folder's checkpoint",
    "progress": "progress bars", "export": "switches to export as per-device modules after training",
    "nproc": "data-parallel processes on this machine (gloo on CPU, nccl on GPU); --batch-size is per "
             "process. Under torchrun leave it at 1",
    "sync_bn": "data-parallel: BN batch statistics over all processes (exact N x batch equivalence); "
               "off: per-process statistics, running rows averaged at checkpoints",
    "dist_backend": "data-parallel backend: auto, gloo or nccl",
}


def _add_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    from slimkern.runner import DEFAULTS

    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML/TOML file whose keys mirror these flags")
    for key, default in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        h = _HELP.get(key, "")
        shown = defaults.get(key, default)
        h = f"{h} (default: {shown!r})" if h else f"(default: {shown!r})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=h,
                           type=float if key == "milestones" else str)
        elif default is None:
            p.add_argument(flag, default=argparse.SUPPRESS, help=h)
        else:
            p.add_argument(flag, type=type(default), default=argparse.SUPPRESS, help=h)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimkern", description="Slimmable and ParaDiS networks: train, "
                                     "evaluate, export.")
    sub = parser.add_subparsers(dest="command")  # no fixed metavar: argparse lists every command added
    sub.required = True
    _add_options(sub.add_parser("train", help="train a slimmable / ParaDiS network"), {})
    pe = sub.add_parser("eval", help="calibrate BN and evaluate a run's checkpoint")
    pe.add_argument("--run", required=True, help="run folder written by `slimkern train`")
    pe.add_argument("--switches", nargs="*", default=None, help="switches to evaluate (default: the run's)")
    pe.add_argument("--calibrate-batches", type=int, default=None)
    pe.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    px = sub.add_parser("export", help="export a switch of a run as per-device modules")
    px.add_argument("--run", required=True, help="run folder written by `slimkern train`")
    px.add_argument("--switch", nargs="+", required=True, help="switch(es) to export, e.g. '[0.5, 0.5]x'")
    px.add_argument("--calibrate", type=int, default=None, metavar="N",
                    help="first recompute the switches' BN statistics over N training batches, as the run's "
                         "evaluation did (needed for a switch the run evaluated but did not train)")
    sub.add_parser("info", help="what was built: C++/CUDA/Triton kernels, versions")
    pd = sub.add_parser("demo", help="run a demo (default: fl, the federated demo)")
    pd.add_argument("which", nargs="?", default="fl", choices=["fl", "paradis", "nas"],
                    help="fl: federated paradis vs heterofl vs small-model fedavg on digits; "
                         "paradis: ParaDiS MobileNet-v1 on digits with an individual baseline; "
                         "nas: Slim / OWS / AOWS multi-platform width search on digits")
    _add_options(pd, DEMO_PARADIS)
    from slimkern.fl.cli import add_fl_parser

    add_fl_parser(sub)
    from slimkern.nas.cli import add_search_parser

    add_search_parser(sub)
    from slimkern.study.cli import add_study_parser

    add_study_parser(sub)
    from slimkern.prune.cli import add_prune_parser

    add_prune_parser(sub)
    from slimkern.paper_cli import add_parsers as add_paper_parsers

    add_paper_parsers(sub)
    from slimkern.paradis.cli import add_paradis_parser

    add_paradis_parser(sub)
    return parser


def resolve(args: argparse.Namespace, preset: dict | None = None) -> dict:
    from slimkern.runner import DEFAULTS

    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    config, source = {}, "config"
    if getattr(args, "config", None):
        config, source = load_config(args.config), f"config {args.config!r}"
    return merge({**DEFAULTS, **(preset or {})}, config, given, source)


def _console():
    from rich.console import Console

    return Console()


def _load_run(run: str):
    import torch
    import yaml

    from slimkern import runner
    from slimkern.train.checkpoint import load_checkpoint

    cfg_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"not a run folder (no config.yaml): {run!r}")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = {**runner.DEFAULTS, **yaml.safe_load(fh)}
    split = runner.load_data(cfg)
    net = runner.build_model(cfg, split)
    state = load_checkpoint(os.path.join(run, "checkpoint.pt"))
    net.load_state_dict(state["model"])
    torch.set_grad_enabled(True)
    return cfg, split, net


def cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    import slimkern
    from slimkern import runner

    cfg, split, net = _load_run(args.run)
    trained = [runner.parse_switch(s) for s in cfg["switches"]]
    if cfg["recipe"] == "sandwich":
        trained = [slimkern.Switch.width(cfg["max_width"]), slimkern.Switch.width(cfg["min_width"])]
    sws = [runner.parse_switch(s) for s in (args.switches or (cfg["switches"] + cfg["eval_switches"]))]
    sws = list(dict.fromkeys(sws))
    nb = args.calibrate_batches or cfg["calibrate_batches"]
    calib = DataLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                       generator=torch.Generator().manual_seed(cfg["seed"] + 7))
    slimkern.calibrate_bn(net, calib, sws, num_batches=nb)
    test = DataLoader(split.test, batch_size=cfg["eval_batch_size"], shuffle=False)
    report = slimkern.evaluate(net, test, sws, trained=trained, input_size=split.input_size, progress=args.progress)
    report.meta.update({"title": f"{cfg['recipe']} {cfg['model']} on {cfg['dataset']} (eval)"})
    report.to_json(os.path.join(args.run, "eval.json"))
    report.to_csv(os.path.join(args.run, "eval.csv"))
    report.plot(os.path.join(args.run, "eval.png"))
    _console().print(report.table())
    return 0


def cmd_export(args) -> int:
    from slimkern import runner

    if args.calibrate is not None and args.calibrate < 1:
        raise ValueError(f"--calibrate needs a number of batches >= 1, got {args.calibrate}")
    sws = [runner.parse_switch(s) for s in args.switch]
    cfg, split, net = _load_run(args.run)
    if args.calibrate:
        import slimkern
        import torch
        from torch.utils.data import DataLoader

        calib = DataLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                           generator=torch.Generator().manual_seed(cfg["seed"] + 7))  # the run's calibration
        slimkern.calibrate_bn(net, calib, sws, num_batches=args.calibrate)
    con = _console()
    for sw in sws:
        try:
            paths = runner.export_switch(net, sw, args.run, split.input_size)
        except ValueError as exc:
            if args.calibrate or "no BN statistics" not in str(exc):
                raise
            raise ValueError(f"{exc}; from the command line: slimkern export --calibrate N") from None
        con.print(f"exported {sw}: " + ", ".join(paths))
    return 0


def _remove_unfinished_run(out: str, existed: bool, keep_finished: bool = False) -> None:
    """A command that failed leaves no half-written run folder: the folder it created goes
    unless it holds a checkpoint (``--resume`` continues from that; a kill runs no cleanup,
    and the atomic writes keep that checkpoint whole). ``keep_finished``: the experiment
    commands (search, prune, sr, scaling, paradis, study) rerun skipping the jobs whose results
    they find, so any whole file (not an atomic write's temporary) keeps the folder."""
    import glob
    import shutil

    if existed or not os.path.isdir(out):
        return
    files = [f for f in glob.glob(os.path.join(glob.escape(out), "**", "*"), recursive=True) if os.path.isfile(f)]
    if any(f.endswith(".pt") for f in files):
        return
    if keep_finished and any(".tmp" not in os.path.basename(f) for f in files):
        return
    shutil.rmtree(out, ignore_errors=True)


def _experiment(args, run) -> int:
    """Runs an experiment command; on failure the run folder it created goes unless it holds
    finished results (see _remove_unfinished_run)."""
    out = getattr(args, "out", None)
    existed = out is None or os.path.exists(out)
    try:
        return run(args)
    except BaseException:
        if out is not None:
            _remove_unfinished_run(out, existed, keep_finished=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "info":
            from slimkern import info

            return info.main() or 0
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "study":
            from slimkern.study.cli import cmd_study

            return _experiment(args, cmd_study)
        if args.command == "search" or (args.command == "demo" and args.which == "nas"):
            from slimkern.nas import cli as nas_cli

            return _experiment(args, nas_cli.cmd_search if args.command == "search" else nas_cli.cmd_demo)
        if args.command == "prune":
            from slimkern.prune import cli as prune_cli

            return _experiment(args, prune_cli.cmd_prune)
        if args.command in ("sr", "scaling", "deploy"):
            from slimkern import paper_cli

            return _experiment(args, paper_cli.cmd)
        if args.command == "paradis":
            from slimkern.paradis import cli as paradis_cli

            return _experiment(args, paradis_cli.cmd_paradis)
        if args.command == "fl" or (args.command == "demo" and args.which == "fl"):
            from slimkern.fl import cli as fl_cli

            return fl_cli.cmd_fl(args) if args.command == "fl" else fl_cli.cmd_fl_demo(args)
        from slimkern import runner

        cfg = resolve(args, DEMO_PARADIS if args.command == "demo" else None)
        from slimkern.train import distributed

        if cfg["seeds"] and (cfg["nproc"] > 1 or distributed.launched()):
            raise ValueError("--seeds runs seeds one after another in one process; with --nproc or torchrun "
                             "start one data-parallel job per seed (--seed k) instead")
        if cfg["nproc"] > 1 and not distributed.launched():  # start the ranks; each runs this command
            runner.check(cfg)
            return distributed.launch([sys.executable, "-m", "slimkern", *(sys.argv[1:] if argv is None else argv)],
                                      cfg["nproc"])
        con = _console()
        title = "ParaDiS demo: MobileNet-v1 on digits" if args.command == "demo" else None
        if cfg["seeds"]:
            from slimkern.paradis.seeds import run_seeds

            run_seeds(cfg, cfg["seeds"], console=con, title=title)
            con.print(f"run folder: {os.path.abspath(cfg['out'])} (summary.json, summary.csv, seed<k>/)")
            return 0
        existed = os.path.exists(cfg["out"]) or distributed.launched()  # ranks: rank 0 owns the folder
        try:
            report = runner.run(cfg, console=con, title=title)
        except BaseException:
            _remove_unfinished_run(cfg["out"], existed)
            raise
        finally:
            distributed.shutdown()
        if report is None:  # a data-parallel rank other than 0
            return 0
        con.print(f"run folder: {os.path.abspath(cfg['out'])}  ({report.meta['total_seconds']:.1f} s)")
        return 0
    except TrainingCollapsed as exc:
        print(f"slimkern {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"slimkern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
