"""``slimkern study proposal|otfusion`` (hooked into ``slimkern/cli.py``).

    slimkern study proposal --out runs/study-proposal          # issue 17's federated study
    slimkern study proposal --seeds 0 --alphas 1.0 --rounds 2  # a quick look
    slimkern study otfusion --seeds 0 1 2 --out runs/otfusion  # one-shot OT fusion vs averaging

Any error is one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_study_parser", "cmd_study"]


def add_study_parser(sub) -> argparse.ArgumentParser:
    from slimkern.study.proposal import METHODS, PROPOSAL
    p = sub.add_parser("study", help="the research studies: proposal (federated), otfusion (one-shot)")
    which = p.add_subparsers(dest="study", required=True)
    pp = which.add_parser("proposal", help="FedDF vs shared slimmable training vs OT-aligned aggregation on digits")
    pp.add_argument("--seeds", type=int, nargs="+", default=PROPOSAL["seeds"])
    pp.add_argument("--alphas", type=float, nargs="+", default=PROPOSAL["alphas"], help="Dirichlet label skew")
    pp.add_argument("--methods", nargs="+", default=PROPOSAL["methods"], help=f"subset of {list(METHODS)}")
    for key in ("clients", "rounds", "local_epochs", "batch_size", "distill_steps", "workers"):
        pp.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=PROPOSAL[key])
    pp.add_argument("--lr", type=float, default=PROPOSAL["lr"])
    pp.add_argument("--tiers", default=PROPOSAL["tiers"], help="three one-branch widths 'name=width:fraction,...'")
    pp.add_argument("--out", default=PROPOSAL["out"])
    po = which.add_parser("otfusion", help="one-shot OT fusion of digits models vs vanilla averaging")
    po.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    po.add_argument("--epochs", type=int, default=15)
    po.add_argument("--out", default="runs/otfusion")
    return p


def cmd_study(args) -> int:
    try:
        if args.study == "proposal":
            from slimkern.study.proposal import PROPOSAL, run_proposal
            cfg = {k: getattr(args, k) for k in PROPOSAL if hasattr(args, k)}
            run_proposal(cfg)
            print(f"report: {os.path.join(args.out, 'report.json')}  table: {os.path.join(args.out, 'table.md')}  "
                  f"plot: {os.path.join(args.out, 'proposal.png')}")
            return 0
        from slimkern.study.otfusion_oneshot import run_otfusion_oneshot
        run_otfusion_oneshot(seeds=tuple(args.seeds), epochs=args.epochs, out=args.out)
        print(f"report: {os.path.join(args.out, 'report.json')}  plot: {os.path.join(args.out, 'otfusion.png')}")
        return 0
    except Exception as exc:  # noqa: BLE001 - the command line reports, it does not crash
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"slimkern study: error: {msg}", file=sys.stderr)
        return 2
