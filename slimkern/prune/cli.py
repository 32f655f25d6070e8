"""``slimkern prune dac|dwnp``: the two pruning methods on digits (or any ``slimkern.data`` split),
one run folder per call with the report of every seed (``run_folder``).

    slimkern prune dac  --budgets macs_ratio=0.5 macs_ratio=0.8 --clients 4 --rounds 5 --seeds 0 1 2
    slimkern prune dwnp --p-server 0.8 --p-devices 0.6 0.5 0.4 0.3 --clients 4 --rounds 10 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["add_prune_parser", "cmd_prune"]


def _budget(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"budget {text!r}: use key=value[,key=value], e.g. macs_ratio=0.5")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget {text!r}: {val!r} is not a number") from None
    return out


def _epochs(text: str):
    if text == "random":
        return "random"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"local epochs must be an int or 'random', got {text!r}") from None


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help="run folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--width-mult", type=float, default=0.5, help="MobileNet-v2 width of the 1.0x model")
    p.add_argument("--last-channels", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--classes-per-client", type=int, default=2, help="shards: classes per client (non-IID)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)


_SCENARIOS = {"iid": ("iid", 1), "iid-random-epochs": ("iid", "random"), "2-class": ("shards", 1)}


def _dac_server_args(p: argparse.ArgumentParser, out: str) -> None:
    """The options of DAC's server side (model, data, Algorithm 1), shared by dac-sweep and dac-gates;
    defaults are the small setting (digits at their native 8x8, MobileNet-v2 x0.35)."""
    p.add_argument("--out", default=out, help="run folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--width-mult", type=float, default=0.35, help="MobileNet-v2 width of the 1.0x model")
    p.add_argument("--last-channels", type=int, default=128)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    _dac_algorithm_args(p)


def _dac_algorithm_args(p: argparse.ArgumentParser) -> None:
    """DAC's budgets, server reference data, optimiser and Algorithm-1 options (dac, dac-sweep, dac-gates)."""
    p.add_argument("--budgets", type=_budget, nargs="+", default=[{"macs_ratio": 0.5}, {"macs_ratio": 0.8}],
                   help="budgets, assigned to clients round-robin: macs=.. / params=.. or macs_ratio=.. / "
                        "params_ratio=..")
    p.add_argument("--reference-fraction", type=float, default=0.2, help="server reference data (of train)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--guard-fraction", type=float, default=0.2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--gate-lr", type=float, default=None, help="learning rate of the gates (default: --lr)")


def _dac_options(args) -> dict:
    opts = {"threshold": args.threshold, "guard_fraction": args.guard_fraction, "finetune_epochs": args.finetune_epochs}
    if getattr(args, "gate_lr", None) is not None:
        opts["gate_lr"] = args.gate_lr
    return opts


def add_prune_parser(sub) -> argparse.ArgumentParser:
    """Adds ``prune`` (with ``dac`` and ``dwnp``) to an ``argparse`` subparsers object."""
    p = sub.add_parser("prune", help="channel pruning to per-device budgets: DAC and DWNP (federated simulation)")
    ps = p.add_subparsers(dest="method", metavar="{dac,dac-sweep,dac-gates,dwnp}")
    ps.required = True
    d = ps.add_parser("dac", help="DAC: Algorithm 1 per budget, then clustered FedAvg (Li & Sanyal)")
    _common(d, "runs/prune-dac")
    _dac_algorithm_args(d)
    d.add_argument("--local-epochs", type=_epochs, default=1, help="int or 'random' ({3,4,5} per client/round)")
    d.add_argument("--no-width-baselines", action="store_true")
    d.add_argument("--full-baseline", action="store_true", help="also FedAvg the 1.0x model over all clients")
    sw = ps.add_parser("dac-sweep", help="DAC Figures 4-5: clustered FedAvg vs number of clients, per scenario")
    _dac_server_args(sw, "runs/prune-dac-sweep")
    sw.add_argument("--client-counts", type=int, nargs="+", default=[2, 4, 8, 16])
    sw.add_argument("--scenarios", nargs="+", default=list(_SCENARIOS), choices=list(_SCENARIOS),
                    help="iid: IID, 1 local epoch; iid-random-epochs: IID, {3,4,5} per client and round; "
                         "2-class: 2 classes per client (more when N < 5)")
    sw.add_argument("--rounds", type=int, default=3)
    sw.add_argument("--width-baselines", action="store_true", help="also the equal-cost width-multiplier models")
    sw.add_argument("--full-baseline", action="store_true", help="also FedAvg the 1.0x model over all N clients")
    g = ps.add_parser("dac-gates", help="why the 0.1 gate threshold fires or not: Algorithm 1 per gate lr")
    _dac_server_args(g, "runs/prune-dac-gates")
    g.add_argument("--gate-lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    w = ps.add_parser("dwnp", help="DWNP: hypernetwork masks, bilevel federated training (Gao et al.)")
    _common(w, "runs/prune-dwnp")
    w.add_argument("--p-server", type=float, default=0.8, help="server FLOPs ratio target")
    w.add_argument("--p-devices", type=float, nargs="+", default=[0.6, 0.5, 0.4, 0.3],
                   help="device FLOPs ratio targets (one per client, or one for all)")
    w.add_argument("--local-epochs", type=int, default=1)
    w.add_argument("--lr-w", type=float, default=0.05)
    w.add_argument("--lr-hn", type=float, default=1e-3)
    w.add_argument("--lam", type=float, default=2.0)
    w.add_argument("--regularizer", default="abs_log", choices=["abs_log", "sq_log"])
    w.add_argument("--no-project", action="store_true", help="report the learned masks as they are")
    w.add_argument("--no-base", action="store_true", help="skip the unpruned FedAvg baseline")
    return p


def _data(args, seed):
    import torch
    from torch.utils.data import Subset

    from slimkern.data import digits
    from slimkern.fl import partition

    split = digits(image_size=args.image_size, seed=seed)
    labels = split.train.tensors[1].numpy()
    return split, labels, torch, Subset, partition


def _dac(args, seed, log):
    split, labels, torch, Subset, partition = _data(args, seed)
    from slimkern.models import mobilenet_v2
    from slimkern.prune.dac_federated import dac_federated

    if not 0 < args.reference_fraction < 1:
        raise ValueError(f"--reference-fraction must be in (0, 1), got {args.reference_fraction}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(args.reference_fraction * len(perm)))
    ref, rest = perm[:k], perm[k:]
    parts = partition(labels[rest], args.clients, args.partition, alpha=args.alpha,
                      classes_per_client=args.classes_per_client, seed=seed)
    sets = [Subset(split.train, [rest[i] for i in p]) for p in parts]
    budgets = [args.budgets[i % len(args.budgets)] for i in range(args.clients)]
    torch.manual_seed(seed)
    net = mobilenet_v2(split.num_classes, split.in_channels, width_mult=args.width_mult,
                       last_channels=args.last_channels)
    r = dac_federated(net, budgets, sets, Subset(split.train, ref), split.test, input_size=split.input_size,
                      rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr, momentum=args.momentum,
                      batch_size=args.batch_size, pretrain_epochs=args.pretrain_epochs,
                      width_baselines=not args.no_width_baselines, full_baseline=args.full_baseline,
                      seed=seed, log=log,
                      dac_options=_dac_options(args))
    s = r.summary()
    s["seed"] = seed
    s["models"] = {f"{c.kind}_{j}": c.model.state_dict() for j, c in enumerate(r.clusters)}
    return s


def _dwnp(args, seed, log):
    split, labels, torch, Subset, partition = _data(args, seed)
    from slimkern.models import mobilenet_v2
    from slimkern.prune.dwnp_federated import dwnp_federated

    parts = partition(labels, args.clients, args.partition, alpha=args.alpha,
                      classes_per_client=args.classes_per_client, seed=seed)
    sets = [Subset(split.train, p.tolist()) for p in parts]
    p_dev = args.p_devices * args.clients if len(args.p_devices) == 1 else args.p_devices
    torch.manual_seed(seed)
    net = mobilenet_v2(split.num_classes, split.in_channels, width_mult=args.width_mult,
                       last_channels=args.last_channels)
    r = dwnp_federated(net, sets, split.test, input_size=split.input_size, p_server=args.p_server,
                       p_devices=p_dev, rounds=args.rounds, local_epochs=args.local_epochs, lr_w=args.lr_w,
                       lr_hn=args.lr_hn, lam=args.lam, regularizer=args.regularizer, batch_size=args.batch_size,
                       project=not args.no_project, base_fedavg=not args.no_base, seed=seed, log=log)
    from slimkern.prune.run_folder import dwnp_record
    return dwnp_record(r, seed)


def _server_data(args, seed):
    import torch

    from slimkern.data import digits
    from slimkern.models import mobilenet_v2

    split = digits(image_size=args.image_size, seed=seed)
    torch.manual_seed(seed)
    net = mobilenet_v2(split.num_classes, split.in_channels, width_mult=args.width_mult,
                       last_channels=args.last_channels)
    return split, net


def _sweep(args, seed, log):
    from slimkern.prune.dac_sweep import dac_client_sweep

    split, net = _server_data(args, seed)
    return dac_client_sweep(net, args.budgets, split.train, split.train.tensors[1].numpy(), split.test,
                            input_size=split.input_size, clients=args.client_counts,
                            scenarios={k: _SCENARIOS[k] for k in args.scenarios},
                            reference_fraction=args.reference_fraction, rounds=args.rounds, lr=args.lr,
                            momentum=args.momentum, batch_size=args.batch_size, pretrain_epochs=args.pretrain_epochs,
                            width_baselines=args.width_baselines, full_baseline=args.full_baseline,
                            dac_options=_dac_options(args), seed=seed, log=log)


def _gates(args, seed, log):
    from slimkern.prune.dac_gate_study import dac_gate_study

    split, net = _server_data(args, seed)
    return dac_gate_study(net, args.budgets, split.train, split.test, input_size=split.input_size,
                          gate_lrs=args.gate_lrs, reference_fraction=args.reference_fraction,
                          batch_size=args.batch_size, pretrain_epochs=args.pretrain_epochs,
                          dac_options={**_dac_options(args), "lr": args.lr}, seed=seed, log=log)


def _cmd_study(args, log) -> int:
    from slimkern.prune.run_folder import write_gate_run, write_sweep_run
    from slimkern.prune.summary import gate_summary, sweep_summary
    from slimkern.report import atomic_write_text

    t0 = time.perf_counter()
    sweep = args.method == "dac-sweep"
    what = "client sweep" if sweep else "gate study"
    runs = []
    for seed in args.seeds:  # the run folder is rewritten after every seed: a stopped run keeps its seeds
        log(f"--- seed {seed}")
        runs.append((_sweep if sweep else _gates)(args, seed, log))
        meta = {"method": args.method, "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
                "seconds": time.perf_counter() - t0, "threshold": args.threshold,
                "seeds_done": [r["seed"] for r in runs],
                "title": f"DAC {what}: MobileNet-v2 x{args.width_mult} on digits {args.image_size}px"}
        paths = (write_sweep_run if sweep else write_gate_run)(args.out, runs, meta)
        text = (sweep_summary if sweep else gate_summary)({"meta": meta, "runs": runs})
        atomic_write_text(os.path.join(args.out, "summary.md"), f"# {meta['title']}\n\n{text}")
    log(text)
    log(f"run folder: {os.path.abspath(args.out)} "
        f"({', '.join(os.path.basename(p) for p in paths + [os.path.join(args.out, 'summary.md')])})")
    return 0


def cmd_prune(args) -> int:
    from slimkern.prune.run_folder import write_dac_run, write_dwnp_run

    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.method in ("dac-sweep", "dac-gates"):
        return _cmd_study(args, log)
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        log(f"--- seed {seed}")
        runs.append((_dac if args.method == "dac" else _dwnp)(args, seed, log))
    meta = {"method": args.method, "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "seconds": time.perf_counter() - t0,
            "title": f"{args.method.upper()} MobileNet-v2 x{args.width_mult} on digits {args.image_size}px, "
                     f"{args.clients} clients ({args.partition})"}
    write = write_dac_run if args.method == "dac" else write_dwnp_run
    paths = write(args.out, runs, meta)
    from slimkern.prune.summary import dac_summary, dwnp_summary
    from slimkern.report import atomic_write_text

    text = (dac_summary if args.method == "dac" else dwnp_summary)({"meta": meta, "runs": runs})
    atomic_write_text(os.path.join(args.out, "summary.md"), f"# {meta['title']}\n\n{text}")
    paths.append(os.path.join(args.out, "summary.md"))
    log(text)
    log(f"run folder: {os.path.abspath(args.out)} ({', '.join(os.path.basename(p) for p in paths)})")
    return 0


def main(argv=None) -> int:  # ``python -m slimkern.prune.cli``
    parser = argparse.ArgumentParser(prog="slimkern")
    sub = parser.add_subparsers(dest="command")
    add_prune_parser(sub)
    args = parser.parse_args(argv)
    try:
        return cmd_prune(args)
    except (ValueError, TypeError) as exc:
        print(f"slimkern prune {args.method}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
