"""Width groups of a slim net, as the pruning code needs them.

A *width group* (``slimkern.slimmify``'s union-find, or the ``in_group``/``out_group``/``group``
names a hand-built ``slimkern.models`` net carries) is a set of channels that must be kept or
removed together: a conv's outputs, the depthwise conv and BN on them, and every layer tied
to them by a residual add. Pruning picks, per group ``g`` of base width ``C_g``, a set of kept
indices ``K_g`` in ``[0, C_g)``; every layer writing ``g`` keeps output rows ``K_g``, every
layer reading ``g`` keeps input columns ``K_g`` (DESIGN.md, "Pruning").

``channel_groups(net)`` lists, per group: its base width, the layers writing it (dense
producers, depthwise convs, BNs), the layers reading it, and the *mask points*: the modules
whose outputs a channel mask multiplies so that a masked net computes exactly what the pruned
net computes (``slimkern.prune.masks``). A mask point is every BN of the group (its fused
activation, if any, comes first: ``act(bn(x)) * m``) and every conv producer whose output is
not read by a BN alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from slimkern._branch import trace
from slimkern.nn._base import ChannelMixin, SlimModule
from slimkern.nn.batchnorm import _SwitchableBatchNorm
from slimkern.nn.conv import SlimConv2d

__all__ = ["Group", "channel_groups", "as_slim_net"]


@dataclass
class Group:
    """One prunable width group: ``channels`` is its base (1.0x) width ``C_g``."""

    name: str
    channels: int
    producers: list[str] = field(default_factory=list)   # dense conv / linear writing g
    depthwise: list[str] = field(default_factory=list)   # depthwise convs on g
    norms: list[str] = field(default_factory=list)       # BNs on g
    consumers: list[str] = field(default_factory=list)   # conv / linear reading g (dense)
    mask_points: list[str] = field(default_factory=list)  # modules whose output a mask multiplies


def as_slim_net(model: nn.Module, what: str) -> nn.Module:
    """``model`` itself when it is built from slimkern layers, else ``slimkern.slimmify(model)``
    (which finds the width groups of a plain torch model; the model is not changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, SlimModule) for m in model.modules()):
        return model
    from slimkern.slimmify import slimmify
    return slimmify(model)


def _claim(groups: dict[str, Group], name: str | None, c: int, layer: str, what: str) -> Group:
    if name is None:
        raise ValueError(f"{what}: layer {layer!r} has a sliced channel side without a group name; build it with "
                         "in_group/out_group (slimkern.models and slimmify name every group)")
    g = groups.get(name)
    if g is None:
        g = groups[name] = Group(name, c)
    elif g.channels != c:
        raise ValueError(f"{what}: group {name!r} has {g.channels} channels but layer {layer!r} gives it {c}")
    return g


def channel_groups(net: nn.Module, what: str = "channel_groups") -> dict[str, Group]:
    """Width groups of a net of slimkern layers, in graph order (see the module docstring).

    Raises ValueError when a sliced side has no group name or a group's widths disagree."""
    graph = trace(net, what)
    mods = dict(net.named_modules())
    groups: dict[str, Group] = {}
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = mods[n.target]
        if not isinstance(m, SlimModule):
            continue
        users = list(n.users)
        read_by_bn = (len(users) == 1 and users[0].op == "call_module"
                      and isinstance(mods[users[0].target], _SwitchableBatchNorm))
        if isinstance(m, _SwitchableBatchNorm):
            g = _claim(groups, m.group, m.num_features, n.target, what)
            if n.target not in g.norms:
                g.norms.append(n.target)
                g.mask_points.append(n.target)
        elif isinstance(m, ChannelMixin):
            if isinstance(m, SlimConv2d) and m.depthwise:
                if m.slice_out:
                    g = _claim(groups, m.out_group, m.out_channels, n.target, what)
                    if n.target not in g.depthwise:
                        g.depthwise.append(n.target)
                        if not read_by_bn and m.bias is not None:
                            g.mask_points.append(n.target)
                continue
            if m.slice_in:
                g = _claim(groups, m.in_group, m.in_channels, n.target, what)
                if n.target not in g.consumers:
                    g.consumers.append(n.target)
            if m.slice_out:
                g = _claim(groups, m.out_group, m.out_channels, n.target, what)
                if n.target not in g.producers:
                    g.producers.append(n.target)
                    if not read_by_bn:
                        g.mask_points.append(n.target)
    if not groups:
        raise ValueError(f"{what}: {type(net).__name__} has no sliced width group to prune")
    return groups
