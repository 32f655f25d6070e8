"""``slimkern fl --strategy dwnp``: device-wise federated network pruning on the fl command's clients.

DWNP (Gao et al., "Device-Wise Federated Network Pruning") learns one architecture per device,
``a^0 * a^n`` with ``a^n = HN(Emb(n))``, by a bilevel federated loop: each device runs SGD on
the shared weights ``W`` under its mask, then an upper-level step on the hypernetwork over
``D_n^a`` with the FLOPs regulariser of eq. 4; the server averages ``W`` and ``HN``. The loop
is ``slimkern.prune.dwnp_federated`` (its docstring carries the math); this module gives it
the fl command's experiment:

* data and clients as every other strategy (``load_digits_split`` -- the server's calibration
  split stays out of the devices' data --, ``make_clients`` with ``--clients``, ``--partition``,
  ``--alpha``, ``--classes-per-client``, ``--seed``) and the same model (``small_cnn`` with
  ``--channels``);
* each device's FLOPs target from its tier: a one-branch switch ``[w]`` means "affords the
  width-``w`` model", target ``T([w]) / T([1.0])`` (``slimkern.profile`` MACs); a budget
  ``{macs=M}`` means target ``M / T([1.0])`` (clamped to 1: a device that affords more than
  the full model runs it). ``--p-devices`` (one ratio for all, or one per client) overrides
  the tiers; ``--p-server`` is the server's target (0: the largest device target);
* ``--rounds``, ``--local-epochs``, ``--lr`` (SGD on ``W``), ``--batch-size``,
  ``--calib-batches`` (BN re-estimation batches of each pruned model), ``--lr-hn``,
  ``--lam``, ``--regularizer``, ``--project/--no-project``;
* the run folder of ``slimkern prune dwnp`` (report.json with the paper's Table-1 layout,
  devices.csv, dwnp.png, models/ with one physically pruned model per device, summary.md)
  plus config.json, log.txt and checkpoint-dwnp.pt (``--resume`` continues it).

Why not a ``Rule`` of ``slimkern.fl.server``: the round object's state is one flat vector of
switch-sliced parameters, a client's key is a switch or index windows, its reply is that
slice (plus BN rows) and the server evaluates tier switches. DWNP needs arbitrary per-device
channel masks that depend on the client's index, a second shared model (the hypernetwork and
embeddings) averaged with its own rule, a client step after local SGD, and per-device pruned
models as the output. Carrying that through would change the server, client and checkpoint
formats every other rule relies on; the DWNP loop already does it, so the command runs it.

What the fl layer promises elsewhere holds here too: one bad device (its work raises, or its
reply is not finite) is dropped or rejected with its reason and the round goes on (recorded
per round in the history), and a resumed run equals an uninterrupted one.

Options that change training but DWNP does not implement are refused when given:
``--lr-schedule cosine``, client augmentation, ``--server-distill``, ``--engine flower`` and
``--clients-per-round`` below the number of clients (eq. 4 averages over every device).
Options of other rules (``--label-split``, ``--fjord-bn``, ...) and ``--eval-every`` are
ignored, as other rules ignore them; the log names them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from slimkern.fl.demo import DEMO_FL

__all__ = ["DWNP_FL", "device_targets", "run_fl_dwnp"]

# the fl command's defaults with DWNP's own where they differ: ``dwnp_federated``'s, except 30 rounds
# and hypernetwork lr 0.01 (its 10 rounds at ATO's 1e-3 left the learned masks at 0.93-0.96 of the
# full FLOPs for a 0.571 target, 3 seeds: the projection did all the pruning; docs/fl.md)
DWNP_FL: dict = {
    **DEMO_FL, "strategies": ["dwnp"], "tiers": "large device=0.75:0.5,small device=0.5:0.5", "clients": 4,
    "rounds": 30, "lr_hn": 0.01, "local_epochs": 1, "lr": 0.05, "lr_schedule": "constant", "batch_size": 32,
    "aug_rotate": 0.0, "aug_translate": 0.0, "aug_scale": 0.0, "calib_batches": 5, "out": "runs/fl-dwnp",
}

_REFUSED = {  # option -> (the value DWNP implements, why)
    "lr_schedule": ("constant", "the DWNP loop's SGD on W has a constant learning rate"),
    "aug_rotate": (0.0, "the DWNP loop trains on the clients' digits without augmentation"),
    "aug_translate": (0.0, "the DWNP loop trains on the clients' digits without augmentation"),
    "aug_scale": (0.0, "the DWNP loop trains on the clients' digits without augmentation"),
    "server_distill": ("none", "DWNP's server step is its FedAvg of W and the hypernetwork"),
    "engine": ("simulate", "DWNP runs in process only (no Flower app)"),
}
_IGNORED = ("eval_every", "distill_steps", "label_split", "scaler", "clip_norm", "dynamic", "fjord_bn", "fjord_kd")


def device_targets(clients: Sequence, tiers: Sequence, net: torch.nn.Module, input_size: Sequence[int]) -> list[float]:
    """Each client's FLOPs ratio target from its tier (module docstring): ``T([w]) / T([1.0])``
    for a one-branch switch, ``min(1, M / T([1.0]))`` for a budget ``{macs=M}``."""
    from slimkern.profile import profile
    from slimkern.switch import Switch

    full = float(profile(net, Switch([1.0]), input_size=tuple(input_size)).macs)
    by_name = {t.name: t for t in tiers}
    per_tier = {}
    for t in tiers:
        if t.switch is not None:
            if len(t.switch.branches) != 1:
                raise ValueError(f"dwnp: tier {t.name!r} is {t.switch}, {len(t.switch.branches)} devices; a DWNP device "
                                 "runs one pruned sub-network: give a one-branch switch such as 0.5 or {macs=...}")
            per_tier[t.name] = float(profile(net, t.switch, input_size=tuple(input_size)).macs) / full
            continue
        b = t.budget
        if b.devices != 1 or b.params is not None or b.memory is not None or b.macs is None:
            raise ValueError(f"dwnp: tier {t.name!r} must be a FLOPs budget of one device, {{macs=...}}: DWNP's "
                             "targets are FLOPs ratios (no params, memory or devices keys)")
        per_tier[t.name] = min(1.0, float(b.macs) / full)
    unknown = sorted({c.tier for c in clients} - set(by_name))
    if unknown:
        raise ValueError(f"dwnp: clients of unknown tiers {unknown}")
    return [per_tier[c.tier] for c in clients]


def _ratios(values, what: str) -> list[float]:
    if isinstance(values, (str, int, float)):
        values = [values]
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"dwnp: {what} must be FLOPs ratios in (0, 1], got {v!r}") from None
    return out


def _check(given: Mapping, cfg: dict) -> list[str]:
    unknown = sorted(set(given) - set(DWNP_FL))
    if unknown:
        raise ValueError(f"dwnp: unknown options {unknown}; known: {sorted(DWNP_FL)}")
    if list(cfg["strategies"]) != ["dwnp"]:
        raise ValueError(f"dwnp runs alone (its report is per device, with the unpruned FedAvg baseline of the same "
                         f"clients inside): got strategies {list(cfg['strategies'])}")
    for key, (ok, why) in _REFUSED.items():
        if cfg[key] != ok:
            raise ValueError(f"dwnp: --{key.replace('_', '-')} {cfg[key]!r} is not supported ({why}); use {ok!r}")
    n = cfg["clients"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"dwnp: --clients must be an int >= 1 (the number of devices), got {n!r}")
    k = cfg["clients_per_round"]
    if k not in (0, None, n):
        raise ValueError(f"dwnp: --clients-per-round {k} is not supported: eq. 4 averages over every device each round "
                         f"(use 0 or {n})")
    return [k for k in _IGNORED if k in given]


def run_fl_dwnp(cfg: Mapping | None = None, progress: bool = True, resume: bool = False,
                fault_fn: Callable[[int, int, dict, dict], tuple[dict, dict] | None] | None = None) -> dict:
    """Runs DWNP with ``DWNP_FL`` overridden by ``cfg`` (the options the user gave; keys of
    ``slimkern.fl.demo.DEMO_FL``) and writes the run folder ``cfg["out"]``; returns the report
    (``{"meta", "runs": [DWNPResult.summary() + seed, device tiers, kept channels]}``).
    ``fault_fn``: as ``dwnp_federated``'s (robustness tests). A run that fails removes the
    folder it created unless it holds a checkpoint."""
    given = dict(cfg or {})
    if isinstance(given.get("strategies"), str):
        given["strategies"] = [given["strategies"]]
    cfg = {**DWNP_FL, **given}
    ignored = _check(given, cfg)
    out = cfg["out"]
    existed = os.path.exists(out)
    try:
        return _run(cfg, ignored, progress, resume, fault_fn)
    except BaseException:
        from slimkern.cli import _remove_unfinished_run  # the experiment commands' rule: no half-written folder
        _remove_unfinished_run(out, existed)
        raise


def _run(cfg: dict, ignored: list[str], progress: bool, resume: bool, fault_fn) -> dict:
    from torch.utils.data import Subset, TensorDataset

    from slimkern.fl.demo import load_digits_split
    from slimkern.fl.models import small_cnn
    from slimkern.fl.simulate import make_clients, parse_tiers
    from slimkern.prune.dwnp_federated import dwnp_federated
    from slimkern.prune.run_folder import dwnp_record, write_dwnp_run
    from slimkern.prune.summary import dwnp_summary
    from slimkern.report import atomic_write_text

    t0 = time.perf_counter()
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    atomic_write_text(os.path.join(out, "config.json"), json.dumps(cfg, indent=2))
    lines: list[str] = []
    logger = logging.getLogger("slimkern.fl.dwnp")

    def log(msg: str) -> None:
        lines.append(msg)
        logger.info(msg)
        if progress:
            print(msg, flush=True)

    if ignored:
        log(f"dwnp ignores {', '.join('--' + k.replace('_', '-') for k in ignored)} (options of other rules)")
    seed = int(cfg["seed"])
    train, _calib, test = load_digits_split(seed, cfg["calib_fraction"])
    tiers = parse_tiers(cfg["tiers"])
    clients = make_clients(train[1].numpy(), tiers, cfg["clients"], cfg["partition"], alpha=cfg["alpha"],
                           classes_per_client=cfg["classes_per_client"], seed=seed)
    net = small_cnn(10, 1, tuple(cfg["channels"]), seed=seed)
    input_size = (1, *train[0].shape[1:])
    if cfg["p_devices"]:
        targets = _ratios(cfg["p_devices"], "--p-devices")
        if len(targets) == 1:
            targets = targets * len(clients)
        if len(targets) != len(clients):
            raise ValueError(f"dwnp: --p-devices gives {len(targets)} targets for {len(clients)} clients (one per "
                             "client, or one for all)")
        source = "--p-devices"
    else:
        targets = device_targets(clients, tiers, net, input_size)
        source = "tiers"
    p_server = _ratios(cfg["p_server"], "--p-server")[0] or max(targets)
    data = TensorDataset(*train)
    sets = [Subset(data, [int(i) for i in c.indices]) for c in clients]
    log(f"dwnp: {len(clients)} devices, {sum(len(s) for s in sets)} client samples, {len(test[1])} test; targets "
        f"({source}) " + ", ".join(f"{c.tier} {p:.3f}" for c, p in zip(clients, targets)) + f"; server {p_server:.3f}")
    r = dwnp_federated(net, sets, TensorDataset(*test), input_size=input_size, p_server=p_server, p_devices=targets,
                       rounds=cfg["rounds"], local_epochs=cfg["local_epochs"], lr_w=cfg["lr"], lr_hn=cfg["lr_hn"],
                       lam=cfg["lam"], regularizer=cfg["regularizer"], batch_size=cfg["batch_size"],
                       project=bool(cfg["project"]), calibrate_batches=cfg["calib_batches"], seed=seed,
                       checkpoint=os.path.join(out, "checkpoint-dwnp.pt"), resume=resume, fault_fn=fault_fn, log=log)
    run = dwnp_record(r, seed)
    for c, d in zip(clients, run["devices"]):
        d["client"], d["tier"] = c.id, c.tier
    meta = {"method": "dwnp", "command": "slimkern fl --strategy dwnp", "config": cfg, "targets_from": source,
            "ignored": ignored, "seconds": time.perf_counter() - t0,
            "title": f"DWNP SmallCNN {'-'.join(map(str, cfg['channels']))} on digits 8px, {len(clients)} devices "
                     f"({cfg['partition']}), {cfg['rounds']} rounds"}
    paths = write_dwnp_run(out, [run], meta)
    report = {"meta": meta, "runs": [run]}
    text = dwnp_summary(report)
    atomic_write_text(os.path.join(out, "summary.md"), f"# {meta['title']}\n\n{text}")
    log(text)
    log(f"run folder: {os.path.abspath(out)} ({', '.join(os.path.basename(p) for p in paths)}, summary.md, models/)")
    atomic_write_text(os.path.join(out, "log.txt"), "\n".join(lines) + "\n")
    return report
