"""Model fusion by optimal transport across models of equal or different widths.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (code: sidak/otfusion,
``wasserstein_ensemble.py``). Neurons of independently trained networks are not in the
same order, so averaging their weights entry by entry mixes unrelated neurons. OT fusion
first *aligns* each model's neurons with a target's, layer by layer, by a transport plan,
then averages in the aligned basis.

For every width group ``g`` (the channels one tensor space carries: a layer's outputs, or
a whole residual stream; ``slimkern.fl.ot_graph``), model ``k`` with ``n_k`` neurons and
the target with ``n_t``, the plan ``T in R^{n_k x n_t}`` solves

    min_T <T, M>   s.t.  T 1 = 1/n_k,  T^T 1 = 1/n_t,  T >= 0        (method="emd", POT's ot.emd)
    min_T <T, M> - reg H(T)   (same constraints)                      (method="sinkhorn", ours)

with ``M_ij = ||x_i - y_j||``: ``x_i`` model ``k``'s neuron ``i``, ``y_j`` the target's.
``ground="weights"``: a neuron is its incoming weights (and bias) *after* aligning their
input side with the already solved plans of the groups they read; ``ground="activations"``:
its activations on ``data`` (the BN outputs of the group, else the producers' outputs).
``M`` is scaled to max 1, so ``reg`` is relative to the largest cost.

Aligning model ``k`` into the target basis with ``C = T diag(1/T^T 1)`` (columns sum to 1:
a target neuron is a convex combination of model neurons) and ``R = diag(1/T 1) T`` (rows
sum to 1: a model neuron's outgoing mass is split over the target neurons it maps to):

    W' = C_out^T W R_in        (conv: out dim 0, in dim 1; depthwise and BN: out only)
    b' = C_out^T b,  BN gamma, beta, running mean / var: C^T v

For permutations (``n_k = n_t``, exact plans) this is exactly the permuted model, so a
model fused with a permuted copy of itself is the model. For ``n_k < n_t`` it splits
neurons (a function-preserving widening when the plan is a hard assignment: each copy keeps
the neuron, its outgoing weights are shared), for ``n_k > n_t`` it merges similar neurons.
The fused model is ``sum_k w_k W'_k`` in the target's architecture.

Beyond the anchor code: BN (affine and running statistics move with their channels),
biases, residual groups (one plan per group, from every layer writing it whose input is
already aligned -- the width-group analysis of ``slimmify``), any number of models fused
into one common target (each aligned to the target, not a sequential pairwise chain;
``iters > 1`` re-aligns every model to the previous fused model, a barycenter iteration),
and different widths (rectangular plans, target of either width).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkern.fl.ot_graph import Layer, layer_table

__all__ = ["ot_fuse", "ot_plans", "transport_plan", "read_state", "align_state", "solve_plans"]

_METHODS = ("emd", "sinkhorn")
_GROUNDS = ("weights", "activations")


# --------------------------------------------------------------------------- plans


def transport_plan(M: torch.Tensor, method: str = "emd", reg: float = 1e-2, max_iter: int = 10000) -> torch.Tensor:
    """The coupling ``T [n, m]`` (float64, marginals ``1/n`` and ``1/m``) for costs ``M``.

    ``M`` is divided by its maximum first (so ``reg`` is relative). ``"emd"``: POT's exact
    network simplex ``ot.emd``; ``"sinkhorn"``: ``slimkern.solvers.sinkhorn`` (log domain).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    M = torch.as_tensor(M, dtype=torch.float64)
    if M.dim() != 2 or 0 in M.shape:
        raise ValueError(f"cost matrix must be a non-empty [n, m] matrix, got shape {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError("cost matrix contains NaN or inf (non-finite weights or activations)")
    top = float(M.max())
    if top > 0:
        M = M / top
    n, m = M.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64)
    if method == "emd":
        try:
            import ot
        except ImportError as exc:  # pragma: no cover - pot is a test/extra dependency
            raise ImportError("method='emd' needs POT (pip install pot); or use method='sinkhorn'") from exc
        return torch.from_numpy(np.asarray(ot.emd(a.numpy(), b.numpy(), M.numpy(), numItermax=1_000_000)))
    from slimkern.solvers import sinkhorn
    return sinkhorn(a, b, M, float(reg), method="log", max_iter=max_iter, tol=1e-7)


def _col(T: torch.Tensor) -> torch.Tensor:
    return T / T.sum(0, keepdim=True).clamp_min(1e-300)


def _row(T: torch.Tensor) -> torch.Tensor:
    return T / T.sum(1, keepdim=True).clamp_min(1e-300)


def _out(t: torch.Tensor, T: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """``C^T v`` along ``dim``: the target's neurons as convex combinations of the model's."""
    if T is None:
        return t
    x = t.double().movedim(dim, 0)
    shape = x.shape
    y = _col(T).T @ x.reshape(shape[0], -1)
    return y.reshape((T.shape[1],) + shape[1:]).movedim(0, dim).to(t.dtype)


def _in(t: torch.Tensor, T: torch.Tensor | None) -> torch.Tensor:
    """``W R`` along dim 1: each input neuron's weights split over the neurons it maps to."""
    if T is None:
        return t
    x = t.double().movedim(1, -1)
    y = x @ _row(T)
    return y.movedim(-1, 1).to(t.dtype)


# --------------------------------------------------------------------------- states


def read_state(model: nn.Module, table: Sequence[Layer]) -> dict:
    """``layer name -> {"weight", "bias", "running_mean", "running_var", "switches"}`` (detached
    tensors; missing ones absent). Slim BN statistics are ``[S, C]`` rows, one per switch."""
    mods = dict(model.named_modules())
    state = {}
    for L in table:
        m = mods[L.name]
        d = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, key, None)
            if isinstance(t, torch.Tensor):
                d[key] = t.detach()
        if L.slim_bn:
            d["switches"] = tuple(str(s) for s in m.switches)
        state[L.name] = d
    return state


def group_sizes(state: dict, table: Sequence[Layer], who: str = "model") -> dict:
    """Neurons per width group (from the weights), checking that every layer of a group agrees."""
    sizes: dict = {}

    def put(g, n, name):
        if g is None:
            return
        if sizes.setdefault(g, (n, name))[0] != n:
            raise ValueError(f"ot_fuse: {who}: layer {name!r} has {n} channels in width group {g!r} but layer "
                             f"{sizes[g][1]!r} has {sizes[g][0]}")

    for L in table:
        w = state[L.name].get("weight")
        if w is None:
            w = state[L.name].get("running_mean")
        if w is None:
            continue
        if L.kind == "bn":
            put(L.out_group, w.shape[-1], L.name)
        elif L.kind == "dwconv":
            put(L.out_group, w.shape[0], L.name)
        else:
            put(L.out_group, w.shape[0], L.name)
            put(L.in_group, w.shape[1], L.name)
    return {g: n for g, (n, _) in sizes.items()}


def _producers(table, g):
    return [L for L in table if L.out_group == g and L.kind in ("conv", "linear")]


def _rows(st: dict, L: Layer, T_in) -> torch.Tensor:
    w = _in(st["weight"], T_in)
    parts = [w.reshape(w.shape[0], -1).double()]
    if st.get("bias") is not None:
        parts.append(st["bias"].reshape(-1, 1).double())
    return torch.cat(parts, 1)


def solve_plans(state: dict, anchor: dict, table: Sequence[Layer], *, method: str = "emd", reg: float = 1e-2,
                acts: dict | None = None, anchor_acts: dict | None = None, max_iter: int = 10000) -> dict:
    """Plans ``group -> T [n_model, n_anchor]`` aligning ``state`` to ``anchor`` (module docstring).

    Weights ground (``acts`` None): groups are solved in order of first appearance; a group's
    neurons are the rows of every layer writing it whose input group is already solved (for a
    residual stream: the first block's conv and shortcut; later blocks read the stream they
    write, so they cannot define it). Activations ground: ``acts[g]`` / ``anchor_acts[g]``
    are ``[n, F]`` per-neuron features.
    """
    groups = []
    for L in table:
        if L.out_group is not None and L.out_group not in groups:
            groups.append(L.out_group)
    plans: dict = {}
    if acts is not None:
        for g in groups:
            plans[g] = transport_plan(torch.cdist(acts[g].double(), anchor_acts[g].double()), method, reg, max_iter)
        return plans
    pending = list(groups)
    while pending:
        progress = False
        for g in list(pending):
            ready = [L for L in _producers(table, g) if L.in_group is None or L.in_group in plans]
            if not ready:
                continue
            x = torch.cat([_rows(state[L.name], L, plans.get(L.in_group)) for L in ready], 1)
            y = torch.cat([_rows(anchor[L.name], L, None) for L in ready], 1)
            plans[g] = transport_plan(torch.cdist(x, y), method, reg, max_iter)
            pending.remove(g)
            progress = True
        if not progress:
            raise ValueError(f"ot_fuse: width groups {pending} have no conv/linear layer whose input can be aligned "
                             "first (every writer reads an unsolved group); use ground='activations'")
    return plans


def align_state(state: dict, plans: dict, table: Sequence[Layer]) -> dict:
    """``state`` in the target's neuron basis (``W' = C_out^T W R_in``, module docstring)."""
    out = {}
    for L in table:
        st = state[L.name]
        To = plans.get(L.out_group)
        d = dict(st)
        if "weight" in st:
            w = st["weight"]
            if L.kind in ("conv", "linear"):
                w = _in(w, plans.get(L.in_group))
            d["weight"] = _out(w, To, 0)
        if st.get("bias") is not None:
            d["bias"] = _out(st["bias"], To, 0)
        for key in ("running_mean", "running_var"):
            if key in st:
                d[key] = _out(st[key], To, st[key].dim() - 1)
        out[L.name] = d
    return out


def _average(aligned: Sequence[dict], weights: Sequence[float], anchor: dict, table) -> dict:
    fused = {}
    for L in table:
        ref = anchor[L.name]
        d = dict(ref)
        for key in ("weight", "bias"):
            if ref.get(key) is not None:
                d[key] = sum(w * a[L.name][key].double() for w, a in zip(weights, aligned)).to(ref[key].dtype)
        for key in ("running_mean", "running_var"):
            if key not in ref:
                continue
            if not L.slim_bn:
                d[key] = sum(w * a[L.name][key].double() for w, a in zip(weights, aligned)).to(ref[key].dtype)
                continue
            # switch rows: a row is fused where every model has statistics for that switch,
            # otherwise the anchor's row stays (recalibrate with slimkern.calibrate_bn)
            rows = ref[key].clone()
            for r, sw in enumerate(ref["switches"]):
                if all(sw in a[L.name]["switches"] for a in aligned):
                    rows[r] = sum(w * a[L.name][key][a[L.name]["switches"].index(sw)].double()
                                  for w, a in zip(weights, aligned)).to(rows.dtype)
            d[key] = rows
        fused[L.name] = d
    return fused


def _write(model: nn.Module, state: dict, table) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for L in table:
            m = mods[L.name]
            for key, t in state[L.name].items():
                if key == "switches" or t is None:
                    continue
                getattr(m, key).copy_(t)


# --------------------------------------------------------------------------- activations


def _activations(model: nn.Module, table, data: torch.Tensor, sizes: dict, who: str) -> dict:
    """``group -> [n, F]``: per channel, the outputs on ``data`` of the group's BN layers
    (else of the conv/linear layers writing it), concatenated."""
    mods = dict(model.named_modules())
    taps: dict = {}
    for g in sizes:
        bns = [L.name for L in table if L.kind == "bn" and L.out_group == g]
        taps[g] = bns or [L.name for L in table if L.out_group == g and L.kind != "bn"]
    got: dict = {}
    hooks = []
    for g, names in taps.items():
        for n in names:
            def hook(_m, _i, out, g=g, n=n):
                got.setdefault(g, []).append((n, out.detach()))
            hooks.append(mods[n].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(data)
    except Exception as exc:
        raise ValueError(f"ot_fuse: {who} cannot run on data of shape {tuple(data.shape)}: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    acts = {}
    for g, outs in got.items():
        feats = []
        for n, o in outs:
            if o.dim() < 2 or o.shape[1] != sizes[g]:
                raise ValueError(f"ot_fuse: {who}: layer {n!r} output has shape {tuple(o.shape)}, expected "
                                 f"{sizes[g]} channels of width group {g!r} (run slim nets at their full width)")
            feats.append(o.movedim(1, 0).reshape(sizes[g], -1))
        acts[g] = torch.cat(feats, 1)
    missing = set(sizes) - set(acts)
    if missing:
        raise ValueError(f"ot_fuse: {who}: width groups {sorted(missing)} were not computed by the forward")
    return acts


# --------------------------------------------------------------------------- public


def _check_tables(tables, target_table):
    ref = [(L.name, L.kind, L.in_group, L.out_group) for L in target_table]
    for k, t in enumerate(tables):
        got = [(L.name, L.kind, L.in_group, L.out_group) for L in t]
        if got != ref:
            diff = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            a = got[diff] if diff < len(got) else "(none)"
            b = ref[diff] if diff < len(ref) else "(none)"
            raise ValueError(f"ot_fuse: model {k} cannot be matched to the target: layer {diff} is {a} there but "
                             f"{b} in the target (same layers, kinds and width groups needed; widths may differ)")


def _check_shapes(states, anchor, table):
    for k, st in enumerate(states):
        for L in table:
            w, wt = st[L.name].get("weight"), anchor[L.name].get("weight")
            if w is None or wt is None:
                if (w is None) != (wt is None):
                    raise ValueError(f"ot_fuse: model {k}: layer {L.name!r} has weights in one model only")
                continue
            if tuple(w.shape[2:]) != tuple(wt.shape[2:]):
                raise ValueError(f"ot_fuse: model {k}: layer {L.name!r} has kernel {tuple(w.shape[2:])}, target "
                                 f"{tuple(wt.shape[2:])}")
            if (st[L.name].get("bias") is None) != (anchor[L.name].get("bias") is None):
                raise ValueError(f"ot_fuse: model {k}: layer {L.name!r} has a bias in one model only")
            for side, g, i in (("output", L.out_group, 0), ("input", L.in_group, 1)):  # fixed sides
                if g is None and L.kind in ("conv", "linear") and w.shape[i] != wt.shape[i]:
                    raise ValueError(f"ot_fuse: model {k}: layer {L.name!r} has {w.shape[i]} {side} channels, the "
                                     f"target {wt.shape[i]}; fixed sides (image input, class output) must match")


def _check_args(models, weights, method, reg, ground, data, iters):
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError("ot_fuse: models must be a non-empty list of nn.Modules")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"ot_fuse: models[{k}] is a {type(m).__name__}, not an nn.Module")
    if method not in _METHODS:
        raise ValueError(f"ot_fuse: method must be one of {_METHODS}, got {method!r}")
    if not (isinstance(reg, (int, float)) and not isinstance(reg, bool) and math.isfinite(reg) and reg > 0):
        raise ValueError(f"ot_fuse: reg must be a finite number > 0, got {reg!r}")
    if ground not in _GROUNDS:
        raise ValueError(f"ot_fuse: ground must be one of {_GROUNDS}, got {ground!r}")
    if ground == "activations" and not (isinstance(data, torch.Tensor) and data.dim() >= 2 and len(data) > 0):
        raise ValueError("ot_fuse: ground='activations' needs data, a non-empty input batch tensor [N, ...]")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"ot_fuse: iters must be an int >= 1, got {iters!r}")
    if weights is None:
        return [1.0 / len(models)] * len(models)
    w = [float(x) for x in weights]
    if len(w) != len(models):
        raise ValueError(f"ot_fuse: {len(w)} weights for {len(models)} models")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"ot_fuse: weights must be finite, nonnegative and not all zero, got {w}")
    return [x / sum(w) for x in w]


def ot_plans(models, *, target=None, method: str = "emd", reg: float = 1e-2, ground: str = "weights", data=None,
             max_iter: int = 10000) -> list[dict]:
    """Per model, ``group -> T [n_model, n_target]``: the plans ``ot_fuse`` aligns with (one pass)."""
    _, plans = ot_fuse(models, target=target, method=method, reg=reg, ground=ground, data=data,
                       max_iter=max_iter, return_plans=True)
    return plans


def ot_fuse(models: Sequence[nn.Module], weights: Sequence[float] | None = None, *, target=None,
            method: str = "emd", reg: float = 1e-2, ground: str = "weights", data: torch.Tensor | None = None,
            iters: int = 1, max_iter: int = 10000, return_plans: bool = False):
    """Fuse ``models`` into one model of the target's architecture by OT neuron alignment.

    Args:
        models: nn.Modules with the same layers and width groups (``slimkern.fl.ot_graph``);
            widths (channels per group) may differ. Plain PyTorch models (traced by
            ``torch.fx``) and slimkern nets (at their full allocated width) both work.
        weights: per-model weights of the average (default uniform); normalised.
        target: None (``models[0]``), an index into ``models``, or a module of the same
            layers (its width is the fused model's; its weights are the alignment anchor
            but enter the average only if it is one of ``models``).
        method: ``"emd"`` (exact, POT) or ``"sinkhorn"`` (entropic, ``reg`` relative to the
            largest cost; small ``reg`` approaches ``emd``).
        ground: ``"weights"`` or ``"activations"`` (needs ``data``, an input batch).
        iters: 1 aligns every model to the target; more re-align every model to the
            previous fused model (anchor = fused, a fixed-point barycenter iteration).
        max_iter: Sinkhorn iterations at most.
        return_plans: also return the plans of the last pass, ``[{group: T [n_k, n_t]}]``.

    Returns a new module (a deep copy of the target with fused weights; the inputs are not
    changed). BN running statistics are fused like the affine parameters (exact for
    permutations); after a soft or rectangular fusion recalibrating them on data
    (``slimkern.calibrate_bn`` / a forward pass in train mode) is usually better.

    Raises ValueError on architectures that cannot be matched (different layers, kinds,
    groups, kernel sizes, fixed sides or biases), bad weights / method / reg / ground,
    missing or ill-shaped ``data``.
    """
    weights = _check_args(models, weights, method, reg, ground, data, iters)
    if target is None:
        target = 0
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < len(models):
            raise ValueError(f"ot_fuse: target index {target} is not in [0, {len(models)})")
        target = models[target]
    if not isinstance(target, nn.Module):
        raise TypeError(f"ot_fuse: target must be None, an index or an nn.Module, got {type(target).__name__}")
    table = layer_table(target)
    _check_tables([layer_table(m) for m in models], table)
    states = [read_state(m, table) for m in models]
    anchor = read_state(target, table)
    sizes_t = group_sizes(anchor, table, "target")
    sizes = [group_sizes(st, table, f"model {k}") for k, st in enumerate(states)]
    _check_shapes(states, anchor, table)
    acts = anchor_acts = None
    if ground == "activations":
        acts = [_activations(m, table, data, sizes[k], f"model {k}") for k, m in enumerate(models)]
    fused_model = copy.deepcopy(target)
    plans: list[dict] = []
    for it in range(iters):
        if ground == "activations":
            anchor_acts = _activations(target if it == 0 else fused_model, table, data, sizes_t, "target")
        plans = [solve_plans(st, anchor, table, method=method, reg=reg, max_iter=max_iter,
                             acts=None if acts is None else acts[k], anchor_acts=anchor_acts)
                 for k, st in enumerate(states)]
        aligned = [align_state(st, p, table) for st, p in zip(states, plans)]
        anchor = _average(aligned, weights, anchor, table)
        _write(fused_model, anchor, table)
    return (fused_model, plans) if return_plans else fused_model
