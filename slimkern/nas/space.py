"""The search space: a net's width groups as a chain, and the channel choices of each group.

A slimkern net names every sliced channel dimension by a *group* (``in_group``/``out_group`` of
convs and linears, ``group`` of BNs); layers tied by a residual add share a group. OWS/AOWS
(Berman et al., CVPR 2020) need the groups to form a *chain* ``g_1 - g_2 - ... - g_L``: every
dense layer reads ``g_l`` and writes ``g_{l+1}`` (or reads the fixed image input / writes the
fixed class output), every depthwise conv and BN stays in one group. Then the loss of a
configuration ``c = (c_1..c_L)`` decomposes as ``sum_l L_l(c_l)`` and its resource as
``sum_l R_l(c_l, c_{l+1})``, a chain MRF (``slimkern.solvers``). MobileNet-v1 is a chain (the
paper's setting); ResNets and MobileNet-v2 tie groups through residual adds and are refused.

Choices (AOWS): per group of base width ``C``, ``d * max(1, floor(C f / d + 1/2))`` for
``f`` in ``linspace(0.2, 1.5, 14)``, capped at the group's allocated width (the net's
``max_width``), de-duplicated and sorted. A configuration is a per-layer switch,
``Switch.from_channels({group: channels})``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.nn as nn

from slimkern.switch import Switch

__all__ = ["AOWS_FRACTIONS", "SearchSpace", "search_space"]

#: AOWS's width levels: ``linspace(0.2, 1.5, 14)`` of the base width.
AOWS_FRACTIONS: tuple[float, ...] = tuple(float(f) for f in np.linspace(0.2, 1.5, 14))


def _slim_groups(m: nn.Module):
    """(in_group, out_group) of a slim layer; None for a fixed side."""
    from slimkern.nn.batchnorm import _SwitchableBatchNorm

    if isinstance(m, _SwitchableBatchNorm):
        return m.group, m.group
    gin = m.in_group if getattr(m, "slice_in", False) else None
    gout = m.out_group if getattr(m, "slice_out", False) else None
    return gin, gout


def chain_groups(net: nn.Module, require_chain: bool = True) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Width groups in forward order with their base and allocated widths; with ``require_chain``
    raises ValueError when they do not form a chain."""
    from slimkern._branch import trace
    from slimkern.nn._base import SlimModule

    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module built from slimkern layers, got {type(net).__name__}")
    graph = trace(net, "slimkern.nas")
    mods = dict(net.named_modules())
    order: list[str] = []
    base: dict[str, int] = {}
    full: dict[str, int] = {}
    edges: list[tuple[str, str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), SlimModule):
            continue
        m = mods[node.target]
        gin, gout = _slim_groups(m)
        for side, g in (("input", gin), ("output", gout)):
            sliced = getattr(m, "slice_in" if side == "input" else "slice_out", True)
            if g is None and sliced:
                raise ValueError(f"layer {node.target!r} has a sliced {side} without a channel group name: width "
                                 "search needs named groups (build the net from slimkern.models or slimmify it)")
        if hasattr(m, "num_full"):  # a BN: one side
            sides = ((gout, m.num_features, m.num_full),)
        else:
            sides = ((gin, m.in_channels, m.in_full), (gout, m.out_channels, m.out_full))
        for g, c, f in sides:
            if g is None:
                continue
            if g not in base:
                order.append(g)
                base[g], full[g] = int(c), int(f)
        if gin is not None and gout is not None and gin != gout:
            edges.append((gin, gout, node.target))
    if not order:
        raise ValueError(f"{type(net).__name__} has no sliced channel groups to search")
    if not require_chain:
        return order, base, full
    if len(order) < 2:
        raise ValueError(f"width search needs a chain of at least two channel groups; the net has {order}")
    pos = {g: i for i, g in enumerate(order)}
    for gin, gout, name in edges:
        if pos[gout] != pos[gin] + 1:
            raise ValueError(f"the net's channel groups do not form a chain: layer {name!r} connects {gin!r} to "
                             f"{gout!r}, which are not consecutive in forward order {order} (residual adds tie "
                             "groups; OWS/AOWS search chain nets such as MobileNet-v1)")
    linked = {(pos[a], pos[b]) for a, b, _ in edges}
    for i in range(len(order) - 1):
        if (i, i + 1) not in linked:
            raise ValueError(f"the net's channel groups do not form a chain: no layer connects {order[i]!r} to "
                             f"{order[i + 1]!r}")
    return order, base, full


@dataclass(frozen=True)
class SearchSpace:
    """Groups in chain order, their base/allocated widths and sorted channel choices.

    ``is_chain`` is False for a space built with ``require_chain=False`` (any net): it serves
    non-uniform sandwich training, not the chain search (``cost_model`` refuses it)."""

    groups: tuple[str, ...]
    base: tuple[int, ...]
    full: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    is_chain: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.groups)

    @property
    def max_choices(self) -> int:
        return max(len(c) for c in self.choices)

    def channels(self, path: Sequence[int]) -> dict[str, int]:
        """Channel count per group of a path of choice indices."""
        path = [int(i) for i in path]
        if len(path) != len(self.groups):
            raise ValueError(f"a path needs one choice per group ({len(self.groups)}), got {len(path)}")
        out = {}
        for g, ch, i in zip(self.groups, self.choices, path):
            if not 0 <= i < len(ch):
                raise ValueError(f"group {g!r}: choice index {i} out of range [0, {len(ch)})")
            out[g] = ch[i]
        return out

    def switch(self, path: Sequence[int]) -> Switch:
        """The per-layer switch of a path: ``Switch.from_channels``."""
        return Switch.from_channels(self.channels(path))

    def path(self, config) -> list[int]:
        """Choice indices of a per-layer switch or a ``{group: channels}`` mapping (channels must be choices)."""
        if isinstance(config, Switch):
            if not config.is_per_layer or config.num_branches != 1:
                raise ValueError(f"expected a one-branch per-layer switch, got {config}")
            config = {g: rs[0][1] for g, rs in config._channels}
        out = []
        for g, ch in zip(self.groups, self.choices):
            if g not in config:
                raise ValueError(f"configuration has no entry for group {g!r}")
            if config[g] not in ch:
                raise ValueError(f"group {g!r}: {config[g]} channels is not a choice ({list(ch)})")
            out.append(ch.index(config[g]))
        return out

    def uniform_channels(self, width: float, divisor: int = 1) -> dict[str, int]:
        """Channels of the uniform width ``width`` (``Switch([width])``'s rounding) per group."""
        from slimkern.switch import round_channels
        return {g: min(f, max(divisor, round_channels(width, b, divisor)))
                for g, b, f in zip(self.groups, self.base, self.full)}

    def min_path(self) -> list[int]:
        return [0] * len(self.groups)

    def max_path(self) -> list[int]:
        return [len(c) - 1 for c in self.choices]

    def size(self) -> int:
        return math.prod(len(c) for c in self.choices)


def search_space(net: nn.Module, fractions: Sequence[float] = AOWS_FRACTIONS, divisor: int = 8,
                 min_channels: int = 1, require_chain: bool = True) -> SearchSpace:
    """The chain of width groups of ``net`` and each group's channel choices.

    Args:
        net: a slimkern net whose groups form a chain (MobileNet-v1 and the like).
        fractions: width levels as fractions of each group's base width (AOWS:
            ``linspace(0.2, 1.5, 14)``); levels above the net's ``max_width`` cap at the allocated width.
        divisor: choices are multiples of it (AOWS: 8); a group narrower than the divisor keeps
            its rounded levels at ``>= min_channels``.
        min_channels: the smallest choice allowed.
        require_chain: False lists the groups of any slimkern net (ResNets, MobileNet-v2) for
            non-uniform sandwich training with random per-group widths; the chain search needs True.
    """
    try:
        fr = [float(f) for f in fractions]
    except TypeError:
        raise TypeError(f"fractions must be a sequence of numbers, got {fractions!r}") from None
    if not fr or any(not math.isfinite(f) or f <= 0 for f in fr):
        raise ValueError(f"fractions must be a non-empty list of positive numbers, got {fractions!r}")
    for what, v in (("divisor", divisor), ("min_channels", min_channels)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    order, base, full = chain_groups(net, require_chain)
    choices = []
    for g in order:
        cs = set()
        for f in fr:
            c = divisor * int(math.floor(base[g] * f / divisor + 0.5))
            if c < divisor:
                c = max(min_channels, int(math.floor(base[g] * f + 0.5)))
            cs.add(min(full[g], max(min_channels, c)))
        choices.append(tuple(sorted(cs)))
    return SearchSpace(tuple(order), tuple(base[g] for g in order), tuple(full[g] for g in order),
                       tuple(choices), bool(require_chain))
