"""DWNP's federated bilevel loop (Gao et al., "Device-Wise Federated Network Pruning").

Participants: the server (n = 0) and devices 1..N. Shared: the net's weights ``W`` and the
mask hypernetwork ``HN`` (``MaskHypernetwork``: ``a^n = HN(Emb(n))``). Device ``n`` splits its
data into ``D_n`` (weights) and ``D_n^a`` (architecture, ``hn_fraction`` of it). Each round,
every device starts from the server's ``W`` and ``HN`` and

* lower level: ``local_epochs`` of SGD on ``W`` over ``D_n`` with its current mask
  ``a^0 * a^n`` (the hypernetwork's noise-free hard masks, ``apply_masks``, eq. 3);
* upper level: one pass over ``D_n^a`` updating ``HN`` (Adam) on device ``n``'s share of eq. 4,
  ``L(W, D_n^a; a^0 * a^n) + lambda [R(T(a^0), p_s T) + R(T(a^0 * a^n), p_d^n T)]``, with
  straight-through Gumbel-sigmoid masks and ``W`` held fixed. Averaging these shares over the
  devices gives eq. 4 exactly (its server term is the same in every share).

The server averages ``W`` and ``HN`` with equal weights (eq. 4's ``1/N``); embedding row ``n``
is only trained by device ``n``, so it is taken from that device instead of being diluted by
the average, and row 0 (the server's) is the mean.

Learning rates (heuristic in the spirit of the paper's Theorem 3.1, whose bilevel analysis
needs the architecture step to be small against the weight step so ``W`` tracks its optimum
for the current masks): SGD ``lr_w = 0.05`` on ``W``, Adam ``lr_hn = 1e-3`` on ``HN``
(AutoTrainOnce's value), i.e. a two-timescale schedule. ``lambda = 2`` (ATO's resource weight).

Output: the server sub-network (mask ``a^0``) and one physically pruned sub-network per device
(mask ``a^0 * a^n``), via ``prune_channels``. The learned FLOPs ratios are reported as they
came out; with ``project=True`` a mask whose ratio is off its target by more than ``tol`` is
then projected onto the target by thresholding its logits (bisection; both numbers reported).
Each pruned model's BN statistics are re-estimated on the device's data (``recalibrate_bn``).
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from slimkern.prune.bn_calibration import recalibrate_bn
from slimkern.prune.channels import prune_channels
from slimkern.prune.dwnp_objective import REGULARIZERS, dwnp_objective
from slimkern.prune.fedavg import accuracy, average_states, local_sgd
from slimkern.prune.flops import FlopsModel
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.prune.hypernet import MaskHypernetwork
from slimkern.prune.masks import apply_masks

__all__ = ["DWNPResult", "dwnp_federated", "default_dwnp_groups", "merge_hypernetwork_states", "project_mask",
           "state_problem"]


@dataclass
class DWNPParticipant:
    index: int  # 0 = server
    target: float
    learned_ratio: float
    ratio: float
    macs: int
    params: int
    accuracy: float
    keep: dict = field(default_factory=dict, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"index": self.index, "target": self.target, "learned_ratio": self.learned_ratio, "ratio": self.ratio,
                "macs": self.macs, "params": self.params, "accuracy": self.accuracy,
                "kept_channels": {g: len(k) for g, k in self.keep.items()}}


@dataclass
class DWNPResult:
    base_accuracy: float | None  # unpruned FedAvg, same rounds and data
    shared_accuracy: float  # the shared W, unmasked, after DWNP
    total_macs: int
    server: DWNPParticipant
    devices: list[DWNPParticipant]
    history: list[dict]
    seconds: float

    def summary(self) -> dict:
        return {"base_accuracy": self.base_accuracy, "shared_accuracy": self.shared_accuracy,
                "total_macs": self.total_macs, "server": self.server.summary(),
                "devices": [d.summary() for d in self.devices], "history": self.history, "seconds": self.seconds}


def default_dwnp_groups(net: nn.Module) -> list[str]:
    """Groups written by exactly one layer (not tied by residual adds): for MobileNet-v2 the
    block hidden groups (AutoTrainOnce's choice) plus the few untied stage outputs."""
    return [n for n, g in channel_groups(net, "dwnp").items() if len(g.producers) == 1]


def _mul(a: dict, b: dict) -> dict:
    return {g: a[g] * b[g] for g in a}


def _ensure_one(mask: dict, logits: dict, within: dict | None = None) -> dict:
    out = {}
    for g, m in mask.items():
        m = m.clone()
        if float(m.sum()) == 0:
            z = logits[g].detach().clone()
            if within is not None:
                z[within[g] == 0] = -float("inf")
            m[int(z.argmax())] = 1
        out[g] = m
    return out


@torch.no_grad()
def project_mask(fm: FlopsModel, scores: dict, allowed: dict, target_macs: float) -> dict:
    """Hard mask keeping ``scores >= t`` within ``allowed`` (at least one channel per group),
    with ``t`` found by bisection so that ``T`` is as close to ``target_macs`` as the channel
    granularity allows."""
    def mask_at(t):
        m = {g: ((scores[g] >= t) & (allowed[g] > 0)).float() for g in scores}
        return _ensure_one(m, scores, allowed)

    vals = torch.cat([s[allowed[g] > 0] for g, s in scores.items()])
    lo, hi = float(vals.min()) - 1.0, float(vals.max()) + 1.0  # T(lo) = all allowed, T(hi) = minimum
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(fm.flops(mask_at(mid))) > target_macs:
            lo = mid
        else:
            hi = mid
    a, b = mask_at(lo), mask_at(hi)
    ta, tb = float(fm.flops(a)), float(fm.flops(b))
    return a if abs(ta - target_macs) < abs(tb - target_macs) else b


def merge_hypernetwork_states(states: Sequence[dict], devices: Sequence[int] | None = None,
                              previous: dict | None = None) -> dict:
    """Server aggregation of the hypernetwork: the equal-weight mean of ``states[i]`` (device
    ``i + 1``'s), except embedding row ``n >= 1``, taken from device ``n`` alone (no one else
    trains it; the mean would shrink its update by ``1/N``); row 0 (the server's) is the mean.

    ``devices``/``previous``: when only some devices replied (the others dropped or were
    rejected), ``states[i]`` is device ``devices[i]``'s and the rows of the silent devices keep
    their values in ``previous`` (the server's hypernetwork before the round)."""
    if devices is None:
        devices = list(range(1, len(states) + 1))
    elif len(devices) != len(states) or previous is None:
        raise ValueError(f"merge_hypernetwork_states: {len(states)} states for devices {list(devices)}; a subset of "
                         "devices needs one state each and the previous hypernetwork state")
    avg = average_states(states, [1.0] * len(states))
    emb = avg["embedding.weight"].clone()
    if previous is None and emb.shape[0] != len(states) + 1:
        raise ValueError(f"merge_hypernetwork_states: {len(states)} device states for an embedding of "
                         f"{emb.shape[0]} rows (expected devices + 1)")
    if previous is not None:
        keep = [n for n in range(1, emb.shape[0]) if n not in set(devices)]
        emb[keep] = previous["embedding.weight"][keep].to(emb.dtype)
    for n, st in zip(devices, states):
        if not 1 <= n < emb.shape[0]:
            raise ValueError(f"merge_hypernetwork_states: device {n} has no embedding row (1..{emb.shape[0] - 1})")
        emb[n] = st["embedding.weight"][n]
    avg["embedding.weight"] = emb
    return avg


def state_problem(state, reference: dict, what: str, same_shape=None) -> str | None:
    """Why a device's returned state dict cannot be averaged, or None: it must have
    ``reference``'s entries with their dtypes, finite floats, and ``reference``'s shapes for the
    entries in ``same_shape`` (default: all). The federated core's rule (a bad reply is a
    logged rejection, never an exception; ``slimkern.fl.validate``) applied to DWNP's two
    state dicts. Switchable BN statistics gain rows when a switch first trains, so the first
    reply of a round is held to the server's parameter shapes and the others to the first's."""
    if not isinstance(state, dict) or list(state) != list(reference):
        return f"its {what} state does not have the server's entries"
    for k, v in state.items():
        ref = reference[k]
        if not isinstance(ref, torch.Tensor):  # a module's extra state (switchable BN's row names)
            continue
        if not isinstance(v, torch.Tensor) or v.dtype != ref.dtype:
            return f"its {what} entry {k!r} is not a {ref.dtype} tensor"
        if (same_shape is None or k in same_shape) and v.shape != ref.shape:
            return f"its {what} entry {k!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            return f"its {what} entry {k!r} is not finite"
    return None


def _weights_problem(w_state: dict, server: nn.Module, accepted: list) -> str | None:
    """``state_problem`` of a reply's weights against the round's layout (see there)."""
    if accepted:
        return state_problem(w_state, accepted[0], "weights")
    return state_problem(w_state, server.state_dict(), "weights", {n for n, _ in server.named_parameters()})


def _check_ratio(p, what):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"dwnp_federated: {what} is a FLOPs ratio of the full model and must be in (0, 1], "
                         f"got {p!r}")
    return float(p)


def dwnp_federated(model: nn.Module, client_sets: Sequence[Dataset], test: Dataset, *, input_size,
                   p_server: float, p_devices: Sequence[float], rounds: int = 10, local_epochs: int = 1,
                   lr_w: float = 0.05, momentum: float = 0.9, lr_hn: float = 1e-3, lam: float = 2.0,
                   regularizer: str = "abs_log", hn_fraction: float = 0.2, batch_size: int = 32,
                   groups: Sequence[str] | None = None, project: bool = True, tol: float = 0.05,
                   base_fedavg: bool = True, calibrate_batches: int = 5, seed: int = 0,
                   checkpoint: str | None = None, resume: bool = False,
                   fault_fn: Callable[[int, int, dict, dict], tuple[dict, dict] | None] | None = None,
                   log: Callable[[str], None] | None = None) -> DWNPResult:
    """DWNP (module docstring). ``p_server``/``p_devices[n-1]`` are FLOPs (MACs) ratio targets
    of the full model at ``input_size``; a device model is a sub-network of the server's, so
    ``p_devices[n-1] <= p_server``. Targets below the smallest reachable model are refused.

    One bad device never stops a round (the federated core's promise, ``slimkern.fl.validate``):
    a device whose local work raises is dropped with its reason, a reply whose weights or
    hypernetwork state is not finite (or not shaped like the server's) is rejected with its
    reason, and the round averages the others (``history[r]["accepted" | "rejected" |
    "dropped"]``); a round nobody returns leaves ``W`` and ``HN`` unchanged. ``fault_fn(round,
    device, w_state, hn_state) -> (w_state, hn_state) | None`` is applied to every DWNP reply
    before the server sees it (robustness tests; None: the device never replies).

    ``checkpoint``: a file written atomically after the baseline and every round;
    ``resume=True`` continues it to the identical result, and refuses a checkpoint of another
    run naming what differs (``slimkern.prune.dwnp_checkpoint``)."""
    from slimkern.fl.validate import failure_reason
    from slimkern.prune import dwnp_checkpoint as _ck

    t0 = time.perf_counter()
    say = log or (lambda s: None)
    n_dev = len(client_sets)
    if n_dev < 1 or len(p_devices) != n_dev:
        raise ValueError(f"dwnp_federated: need one FLOPs target per device, got {len(p_devices)} targets for "
                         f"{n_dev} devices")
    p_server = _check_ratio(p_server, "p_server")
    p_devices = [_check_ratio(p, f"p_devices[{i}]") for i, p in enumerate(p_devices)]
    for i, p in enumerate(p_devices):
        if p > p_server:
            raise ValueError(f"dwnp_federated: device {i + 1}'s target {p} exceeds the server's {p_server}: a device "
                             "model is a sub-network of the server's (mask a^0 * a^n)")
    for k, v in {"rounds": rounds, "local_epochs": local_epochs}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"dwnp_federated: {k} must be an int >= 0, got {v!r}")
    if not 0 < hn_fraction < 1:
        raise ValueError(f"dwnp_federated: hn_fraction must be in (0, 1), got {hn_fraction!r}")
    for k, v in {"lr_w": lr_w, "lr_hn": lr_hn}.items():  # checked here, not after the baseline has run
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"dwnp_federated: {k} must be a positive number, got {v!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < float("inf"):
        raise ValueError(f"dwnp_federated: lam must be a number >= 0, got {lam!r}")
    if regularizer not in REGULARIZERS:
        raise ValueError(f"dwnp_federated: regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"dwnp_federated: batch_size must be an int >= 1, got {batch_size!r}")
    if not tol > 0:
        raise ValueError(f"dwnp_federated: tol must be > 0, got {tol!r}")
    if resume and checkpoint is None:
        raise ValueError("dwnp_federated: resume=True needs a checkpoint path")
    if fault_fn is not None and not callable(fault_fn):
        raise TypeError(f"dwnp_federated: fault_fn must be callable (round, device, w_state, hn_state), got {fault_fn!r}")
    torch.manual_seed(seed)
    net = copy.deepcopy(as_slim_net(model, "dwnp_federated"))
    all_groups = channel_groups(net, "dwnp_federated")
    names = list(groups) if groups is not None else default_dwnp_groups(net)
    bad = [g for g in names if g not in all_groups]
    if bad or not names:
        raise ValueError(f"dwnp_federated: unknown or no groups {bad or names}; the net's are {list(all_groups)}")
    fm = FlopsModel(net, input_size)
    total = fm.total
    smallest = fm.minimum(names) / total
    for what, p in [("p_server", p_server)] + [(f"p_devices[{i}]", p) for i, p in enumerate(p_devices)]:
        if p < smallest * (1 + tol):
            raise ValueError(f"dwnp_federated: {what} = {p} is below the smallest reachable model ({smallest:.4f} of "
                             f"the full MACs with every pruned group at one channel)")
    hn = MaskHypernetwork({g: all_groups[g].channels for g in names}, n_dev, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    splits = []
    for i, ds in enumerate(client_sets):
        perm = torch.randperm(len(ds), generator=gen).tolist()
        k = max(1, int(round(hn_fraction * len(ds))))
        splits.append((Subset(ds, perm[k:]), Subset(ds, perm[:k])))
    test_loader = DataLoader(test, batch_size=256)

    def loader(ds, s):
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(s))

    desc, start, base_acc, history = None, 0, None, []
    if checkpoint is not None:
        desc = _ck.run_description(net, client_sets, method="dwnp", seed=seed, rounds=rounds,
                                   local_epochs=local_epochs, lr_w=lr_w, momentum=momentum, lr_hn=lr_hn, lam=lam,
                                   regularizer=regularizer, hn_fraction=hn_fraction, batch_size=batch_size,
                                   groups=names, p_server=p_server, p_devices=p_devices, base_fedavg=base_fedavg,
                                   input_size=list(input_size))
    resumed = bool(resume and os.path.exists(checkpoint))
    if resumed:
        ck = _ck.load_round(checkpoint, desc)
        net.load_state_dict(ck["net"])
        hn.load_state_dict(ck["hn"])
        start, base_acc, history = int(ck["round"]), ck["base_accuracy"], ck["history"]
        torch.set_rng_state(ck["rng"])
        say(f"resuming from {checkpoint} after round {start}")

    if base_fedavg and not resumed:
        base = copy.deepcopy(net)
        for r in range(rounds):
            states = []
            for i, (d, _) in enumerate(splits):
                local = copy.deepcopy(base)
                try:
                    local_sgd(local, loader(d, seed * 7919 + r * 101 + i), local_epochs, lr_w, momentum)
                except Exception as exc:  # noqa: BLE001 - one device never stops the baseline either
                    say(f"unpruned FedAvg round {r + 1}: device {i + 1} dropped: {failure_reason(exc)}")
                    continue
                st = local.state_dict()
                why = _weights_problem(st, base, states)
                if why is not None:
                    say(f"unpruned FedAvg round {r + 1}: rejected device {i + 1}: {why}")
                    continue
                states.append(st)
            if states:
                base.load_state_dict(average_states(states, [1.0] * len(states)))
        base_acc = accuracy(base, test_loader)
        say(f"unpruned FedAvg: accuracy {base_acc:.4f}")
    if checkpoint is not None and not resumed:
        _ck.save_round(checkpoint, 0, desc, net, hn, history, base_acc)

    def device_round(r, n, d, da):
        """Device ``n``'s round: lower-level SGD on ``W`` under its mask, then the upper-level
        pass over ``D_n^a`` on ``HN``. Returns its ``(W, HN)`` states and objective parts."""
        local, lhn = copy.deepcopy(net), copy.deepcopy(hn)
        m = _ensure_one(_mul(lhn.deterministic_masks(0), lhn.deterministic_masks(n)), lhn.logits(n))

        def fwd(x, local=local, m=m):
            with apply_masks(local, m, all_groups):
                return local(x)

        local_sgd(local, loader(d, seed * 7919 + r * 101 + n), local_epochs, lr_w, momentum, forward=fwd)
        opt = torch.optim.Adam(lhn.parameters(), lr=lr_hn)
        local.train()
        g = torch.Generator().manual_seed(seed * 31 + r * 1009 + n)
        parts = []
        for x, y in loader(da, seed + r * 13 + n):
            a0, an = lhn.masks(0, generator=g), lhn.masks(n, generator=g)
            a = _mul(a0, an)
            with apply_masks(local, a, all_groups):
                task = F.cross_entropy(local(x), y)
            loss, part = dwnp_objective([task], fm.flops(a0), [fm.flops(a)], p_server, [p_devices[n - 1]], total,
                                        lam, regularizer)
            opt.zero_grad(set_to_none=True)
            local.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts.append(part)
        return local.state_dict(), lhn.state_dict(), parts

    for r in range(start, rounds):
        ref_hn = hn.state_dict()
        replies, rejected, dropped, parts = [], [], [], []
        for i, (d, da) in enumerate(splits):
            n = i + 1
            try:
                w_state, hn_state, dev_parts = device_round(r, n, d, da)
            except Exception as exc:  # noqa: BLE001 - a failing device is dropped, the round goes on
                dropped.append((n, failure_reason(exc)))
                say(f"DWNP round {r + 1}: device {n} dropped: {dropped[-1][1]}")
                continue
            if fault_fn is not None:
                out = fault_fn(r, n, w_state, hn_state)
                if out is None:
                    dropped.append((n, "no reply"))
                    continue
                w_state, hn_state = out
            why = (_weights_problem(w_state, net, [w for _, w, _ in replies])
                   or state_problem(hn_state, ref_hn, "hypernetwork"))
            if why is not None:
                rejected.append((n, why))
                say(f"DWNP round {r + 1}: rejected device {n}: {why}")
                continue
            replies.append((n, w_state, hn_state))
            parts += dev_parts
        note = ""
        if replies:
            devs = [n for n, _, _ in replies]
            w_new = average_states([w for _, w, _ in replies], [1.0] * len(replies))
            hn_new = merge_hypernetwork_states([h for _, _, h in replies], devs, ref_hn)
            net.load_state_dict(w_new)
            hn.load_state_dict(hn_new)
        else:
            note = "nobody returned a valid update: W and HN are left unchanged"
            say(f"DWNP round {r + 1}: {note}")
        with torch.no_grad():
            a0 = hn.deterministic_masks(0)
            ratios = [float(fm.flops(_mul(a0, hn.deterministic_masks(n)))) / total for n in range(1, n_dev + 1)]
        rec = {"round": r + 1, "server_ratio": float(fm.flops(a0)) / total, "device_ratios": ratios,
               "task": sum(p["task"] for p in parts) / max(len(parts), 1),
               "server_reg": sum(p["server"] for p in parts) / max(len(parts), 1),
               "device_reg": sum(p["devices"] for p in parts) / max(len(parts), 1),
               "accepted": [n for n, _, _ in replies], "rejected": rejected, "dropped": dropped, "note": note}
        history.append(rec)
        if checkpoint is not None:
            _ck.save_round(checkpoint, r + 1, desc, net, hn, history, base_acc)
        say(f"DWNP round {r + 1}: task {rec['task']:.4f}, server ratio {rec['server_ratio']:.3f}, devices "
            + ", ".join(f"{x:.3f}" for x in ratios))

    shared_acc = accuracy(net, test_loader)
    with torch.no_grad():
        z0 = {g: v + hn.offset for g, v in hn.logits(0).items()}
        a0 = _ensure_one(hn.deterministic_masks(0), z0)
        learned0 = float(fm.flops(a0)) / total
        full_allowed = {g: torch.ones_like(v) for g, v in a0.items()}
        if project and abs(learned0 - p_server) > tol * p_server:
            a0 = project_mask(fm, z0, full_allowed, p_server * total)

    def build(idx, mask, learned, target, data):
        keep = {g: torch.nonzero(v).flatten().tolist() for g, v in mask.items()}
        pm = prune_channels(net, keep)
        recalibrate_bn(pm, loader(data, seed + idx), calibrate_batches)
        pm.eval()
        macs = int(round(float(fm.flops(mask))))
        params = sum(p.numel() for p in pm.parameters())
        return DWNPParticipant(idx, target, learned, macs / total, macs, params, accuracy(pm, test_loader), keep, pm)

    ref_all = torch.utils.data.ConcatDataset([d for d, _ in splits])
    server = build(0, a0, learned0, p_server, ref_all)
    devices = []
    for i in range(n_dev):
        n = i + 1
        with torch.no_grad():
            zn = {g: v + hn.offset for g, v in hn.logits(n).items()}
            m = _ensure_one(_mul(a0, hn.deterministic_masks(n)), zn, a0)
            learned = float(fm.flops(m)) / total
            if project and abs(learned - p_devices[i]) > tol * p_devices[i]:
                m = project_mask(fm, zn, a0, p_devices[i] * total)
        devices.append(build(n, m, learned, p_devices[i], splits[i][0]))
        say(f"device {n}: target {p_devices[i]:.3f}, learned {learned:.3f}, final {devices[-1].ratio:.3f}, "
            f"accuracy {devices[-1].accuracy:.4f}")
    return DWNPResult(base_acc, shared_acc, total, server, devices, history, time.perf_counter() - t0)
