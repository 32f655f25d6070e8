"""DAC gates: one learnable scale per input channel of every depthwise conv.

Li & Sanyal (DAC, section 3) put a gate ``w_ij`` on input channel ``i`` of the depthwise
conv of every inverted-residual block ``j`` of MobileNet-v2: the block computes
``dw(x * w_.j)``. Channels whose gate falls to ``<= 0.1`` are removed (Algorithm 1).

The gated blocks are found from the width groups (``slimkern.prune.groups``): every group
with a depthwise conv, which for MobileNet-v2 is each block's hidden group (``slimkern.models``
or torchvision's through ``slimmify``). Because a depthwise conv with zero padding is linear
per channel, ``dw(x * w) = dw_w'(x)`` with filter ``c`` scaled by ``w_c``: ``fold_gates``
writes the gates into the filters, which turns a gated net into a plain one exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from slimkern.prune.groups import Group, channel_groups

__all__ = ["DepthwiseGates"]


class DepthwiseGates(nn.Module):
    """Gates ``w_.j`` (``self.gates[j]``, a ``[C_j]`` parameter) for each gated group
    ``self.names[j]`` of ``net``; initialised to ``init`` (default 1: the net is unchanged).

    ``with gates.attach(net): net(x)`` runs the gated net; ``gates.fold_into(net)`` scales the
    depthwise filters in place (then the gates can be dropped).
    """

    def __init__(self, net: nn.Module, init: float = 1.0, groups: dict[str, Group] | None = None):
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0.0 <= init <= 1.0:
            raise ValueError(f"DepthwiseGates: init must be a number in [0, 1] (gates live there), got {init!r}")
        groups = channel_groups(net, "DepthwiseGates") if groups is None else groups
        self.names = [n for n, g in groups.items() if g.depthwise]
        if not self.names:
            raise ValueError(f"DepthwiseGates: {type(net).__name__} has no depthwise conv to gate (DAC gates the "
                             "depthwise input channels of inverted-residual blocks)")
        self.depthwise = {n: list(groups[n].depthwise) for n in self.names}
        self.gates = nn.ParameterList([nn.Parameter(torch.full((groups[n].channels,), float(init)))
                                       for n in self.names])

    def as_list(self) -> list[torch.Tensor]:
        return list(self.gates)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.gates))

    @contextlib.contextmanager
    def attach(self, net: nn.Module, alive: dict[str, torch.Tensor] | None = None):
        """Within the block, each gated depthwise conv of ``net`` reads ``x * w`` (times ``alive``,
        a 0/1 mask per group, when given)."""
        mods = dict(net.named_modules())
        handles = []

        def pre_for(name: str, j: int):
            gname = self.names[j]

            def pre(mod, args):
                x = args[0]
                w = self.gates[j]
                if alive is not None and gname in alive:
                    w = w * alive[gname].to(w.dtype)
                if x.shape[1] != w.numel():
                    raise ValueError(f"DepthwiseGates: layer {name!r} reads {x.shape[1]} channels but group "
                                     f"{gname!r} has {w.numel()} gates: gates apply at the base width [1.0]x only")
                return (x * w.to(x.dtype).view(1, -1, 1, 1),) + tuple(args[1:])
            return pre

        try:
            for j, g in enumerate(self.names):
                for name in self.depthwise[g]:
                    if name not in mods:
                        raise ValueError(f"DepthwiseGates: net has no layer {name!r}; attach to the net the gates "
                                         "were built for")
                    handles.append(mods[name].register_forward_pre_hook(pre_for(name, j)))
            yield net
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def fold_into(self, net: nn.Module) -> nn.Module:
        """Scales depthwise filter ``c`` of each gated conv of ``net`` by ``w_c`` (in place);
        afterwards ``net(x)`` equals the gated net. Returns ``net``."""
        for j, g in enumerate(self.names):
            w = self.gates[j].detach()
            for name in self.depthwise[g]:
                conv = net.get_submodule(name)
                conv.weight[: w.numel()].mul_(w.to(conv.weight).view(-1, 1, 1, 1))
        return net
