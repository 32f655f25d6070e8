"""Running switches: ``set_switch``, ``use_switch``, ``forward_switches``, switch registry."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from slimkern.nn._base import SlimModule
from slimkern.nn.plan import Plan
from slimkern.switch import Switch

__all__ = ["as_switch", "slim_modules", "set_switch", "use_switch", "current_switches", "forward_switches",
           "register_switches", "registered_switches"]


def as_switch(sw) -> Switch:
    """A Switch from a Switch, a notation string (``"[0.5, 0.5]x"``) or a width (``0.25``)."""
    if isinstance(sw, Switch):
        return sw
    if isinstance(sw, str):
        return Switch.parse(sw)
    if isinstance(sw, (int, float)) and not isinstance(sw, bool):
        return Switch.width(float(sw))
    if isinstance(sw, (list, tuple)):
        return Switch(sw)
    raise TypeError(f"expected a Switch, a string like '[0.5, 0.5]x' or a width, got {type(sw).__name__}")


def slim_modules(net: nn.Module) -> list[tuple[str, SlimModule]]:
    """``(name, module)`` of every slimkern layer of ``net`` (the net itself included)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(net).__name__}")
    return [(n, m) for n, m in net.named_modules() if isinstance(m, SlimModule)]


def _mods(net):
    mods = slim_modules(net)
    if not mods:
        raise ValueError(f"{type(net).__name__} has no slimkern layers (SlimConv2d, SlimLinear, "
                         "SwitchableBatchNorm2d, ...): build it from slimkern.nn or use slimkern.slimmify")
    return mods


def _apply(net, plan: Plan | None) -> None:
    """Sets ``plan`` on every slim layer; validates all layers before changing any."""
    mods = _mods(net)
    prepared = []
    for name, m in mods:
        try:
            prepared.append(m._sk_prepare(plan) if plan is not None else None)
        except ValueError as e:
            raise ValueError(f"layer {name!r} ({type(m).__name__}): {e}") from None
    for (_, m), t in zip(mods, prepared):
        m._sk_commit(plan, t)


def _current_plan(net) -> Plan | None:
    return _mods(net)[0][1]._sk_plan


def current_switches(net: nn.Module) -> tuple[Switch, ...]:
    """The switches of the current plan (``(Switch([1.0]),)`` when none was set)."""
    plan = _current_plan(net)
    return plan.switches if plan is not None else (Switch([1.0]),)


def set_switch(net: nn.Module, sw) -> nn.Module:
    """Makes ``net(x)`` run switch ``sw`` (a Switch, notation string or width); returns ``net``.

    Registers a BN statistics row for ``sw`` if it has none (fresh: mean 0, var 1).
    Raises ValueError naming the layer when ``sw`` does not fit the net (e.g. wider than
    ``max_width``, a branch rounding to zero channels, a per-layer switch missing a group).
    """
    _apply(net, Plan([as_switch(sw)]))
    return net


@contextlib.contextmanager
def use_switch(net: nn.Module, sw) -> Iterator[nn.Module]:
    """``with use_switch(net, sw): net(x)`` runs ``sw``, then restores the previous switch."""
    prev = _current_plan(net)
    set_switch(net, sw)
    try:
        yield net
    finally:
        _apply(net, prev)


def register_switches(net: nn.Module, switches: Iterable) -> list[Switch]:
    """Registers a BN statistics row for each switch in every switchable BN of ``net``
    (explicitly, e.g. before loading or calibrating); returns the net's registered switches."""
    sws = [as_switch(s) for s in switches]
    for s in sws:  # validate all first, so a bad switch registers nothing
        Plan([s])
        for name, m in _mods(net):
            try:
                m._sk_prepare(Plan([s]))
            except ValueError as e:
                raise ValueError(f"layer {name!r} ({type(m).__name__}): {e}") from None
    for _, m in _mods(net):
        if hasattr(m, "register_switch"):
            for s in sws:
                m.register_switch(s)
    return registered_switches(net)


def registered_switches(net: nn.Module) -> list[Switch]:
    """Switches with a BN statistics row, in row order of the first switchable BN (empty if
    the net has no switchable BN)."""
    for _, m in _mods(net):
        if hasattr(m, "switches"):
            return list(m.switches)
    return []


def forward_switches(net: nn.Module, x: torch.Tensor, switches: Sequence, return_features: bool = False):
    """Runs several switches in ONE packed pass: every layer runs once on the blocks of all
    switches (first layer: every block reads the image; later layers: block g reads block
    g's channels; the fused classifier sums each switch's partial logits and adds the bias
    once). Equal to running each switch alone, gradients included (ParaDiS Algorithm 1, the
    sandwich rule).

    Returns a list of per-switch outputs ``[N, ...]``; with ``return_features=True`` also a
    list of the fused layer's inputs (the features before the classifier) per switch,
    zero-padded to the layer's full (``max_width``) width ``[N, C_full, ...]``.

    The net's output must come from a fused layer (``slice_in`` and not ``slice_out``), whose
    output stacks switches along the batch ``[S*N, ...]``.
    """
    if isinstance(switches, (Switch, str)):
        raise TypeError("forward_switches takes a list of switches; wrap a single one in a list")
    sws = [as_switch(s) for s in switches]
    if not sws:
        raise ValueError("forward_switches needs at least one switch")
    if len(set(sws)) != len(sws):
        raise ValueError(f"forward_switches got a switch twice: {[str(s) for s in sws]}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    prev = _current_plan(net)
    plan = Plan(sws, capture=return_features)
    _apply(net, plan)
    try:
        out = net(x)
    finally:
        _apply(net, prev)
    n, s = x.shape[0], len(sws)
    if not isinstance(out, torch.Tensor) or out.shape[0] != s * n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"forward_switches expected the net's output to stack {s} switches along the batch "
                         f"({s * n} rows) but got {got}: the net must end in a fused layer "
                         "(SlimLinear/SlimConv2d with slice_out=False)")
    outs = [out[k * n:(k + 1) * n] for k in range(s)]  # split(0) would give one chunk for an empty batch
    if not return_features:
        return outs
    if len(plan.features) != 1:
        raise ValueError(f"return_features needs exactly one fused layer (slice_in and not slice_out) in the "
                         f"net's forward, found {len(plan.features)}")
    return outs, _scatter_features(plan)


def _scatter_features(plan: Plan) -> list[torch.Tensor]:
    mod, x, t = plan.features[0]
    full = mod.in_full
    blocks = t["blocks"]
    feats = []
    at = 0
    offs = []
    for i0, i1, _, _ in blocks:
        offs.append(at)
        at += i1 - i0
    for g0, g1 in plan.segments:
        order = sorted(range(g0, g1), key=lambda g: blocks[g][0])
        pieces, pos = [], 0
        for g in order:
            i0, i1 = blocks[g][0], blocks[g][1]
            if i0 > pos:
                pieces.append(x.new_zeros(x.shape[0], i0 - pos, *x.shape[2:]))
            pieces.append(x[:, offs[g]:offs[g] + i1 - i0])
            pos = i1
        if pos < full:
            pieces.append(x.new_zeros(x.shape[0], full - pos, *x.shape[2:]))
        feats.append(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
    return feats
