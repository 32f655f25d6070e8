"""``slimkern sr``, ``slimkern scaling``, ``slimkern deploy``: the ParaDiS paper's WDSR
super-resolution (Figure 7), scaling (Appendix F) and parallel deployment (Figure 1 D)
experiments, each writing a run folder (see ``slimkern.sr.experiment``, ``slimkern.scaling``,
``slimkern.deploy.bench``)."""
from __future__ import annotations

import logging
import os

COMMANDS = ("sr", "scaling", "deploy")


def add_parsers(sub) -> None:
    from slimkern.deploy import bench
    from slimkern.sr import experiment
    from slimkern import scaling

    experiment.add_options(sub.add_parser("sr", help="WDSR x2 super-resolution: ParaDiS vs US-Nets vs individual "
                                          "models, PSNR vs MACs (the ParaDiS paper's Figure 7)"))
    scaling.add_options(sub.add_parser("scaling", help="ParaDiS with 4 / 5 / 8 switches and the untrained switches "
                                       "of Appendix F, on digits"))
    bench.add_options(sub.add_parser("deploy", help="run each exported branch of a switch in its own worker "
                                     "process; latency and throughput of [0.5,0.5] on 2 workers vs [1.0] and "
                                     "the US width of the same MACs on 1"))


def cmd(args) -> int:
    logging.getLogger("slimkern").setLevel(logging.INFO)
    opts = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "sr":
        from slimkern.sr import experiment as mod
    elif args.command == "scaling":
        from slimkern import scaling as mod
    elif args.command == "deploy":
        from slimkern.deploy import bench as mod
    else:
        raise ValueError(f"unknown command {args.command!r}; choose one of {COMMANDS}")
    rep = mod.run(opts)
    print(mod.table(rep["rows"] if args.command == "deploy" else rep["summary"]))
    print(f"run folder: {os.path.abspath(opts['out'])}")
    return 0
