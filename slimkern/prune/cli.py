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


def add_prune_parser(sub) -> argparse.ArgumentParser:
    """Adds ``prune`` (with ``dac`` and ``dwnp``) to an ``argparse`` subparsers object."""
    p = sub.add_parser("prune", help="channel pruning to per-device budgets: DAC and DWNP (federated simulation)")
    ps = p.add_subparsers(dest="method", metavar="{dac,dwnp}")
    ps.required = True
    d = ps.add_parser("dac", help="DAC: Algorithm 1 per budget, then clustered FedAvg (Li & Sanyal)")
    _common(d, "runs/prune-dac")
    d.add_argument("--budgets", type=_budget, nargs="+", default=[{"macs_ratio": 0.5}, {"macs_ratio": 0.8}],
                   help="budgets, assigned to clients round-robin: macs=.. / params=.. or macs_ratio=.. / "
                        "params_ratio=..")
    d.add_argument("--reference-fraction", type=float, default=0.2, help="server reference data (of train)")
    d.add_argument("--local-epochs", type=_epochs, default=1, help="int or 'random' ({3,4,5} per client/round)")
    d.add_argument("--lr", type=float, default=0.01)
    d.add_argument("--momentum", type=float, default=0.5)
    d.add_argument("--pretrain-epochs", type=int, default=5)
    d.add_argument("--threshold", type=float, default=0.1)
    d.add_argument("--guard-fraction", type=float, default=0.2)
    d.add_argument("--finetune-epochs", type=int, default=1)
    d.add_argument("--no-width-baselines", action="store_true")
    d.add_argument("--full-baseline", action="store_true", help="also FedAvg the 1.0x model over all clients")
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
                      dac_options={"threshold": args.threshold, "guard_fraction": args.guard_fraction,
                                   "finetune_epochs": args.finetune_epochs})
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
    s = r.summary()
    s["seed"] = seed
    s["models"] = {f"p{d.index}": d.model.state_dict() for d in [r.server] + r.devices}
    s["server"]["keep"] = r.server.keep
    for d, ds in zip(r.devices, s["devices"]):
        ds["keep"] = d.keep
    return s


def cmd_prune(args) -> int:
    from slimkern.prune.run_folder import write_dac_run, write_dwnp_run

    log = lambda s: print(s, flush=True)  # noqa: E731
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
