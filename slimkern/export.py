"""``slimkern.export``: one plain dense model per device for a switch (ParaDiS deployment).

For a switch with branches ``b_0 .. b_{B-1}`` a slim net computes
``logits = sum_i W[:, b_i] @ f_i(x) + bias`` where ``f_i`` is the sub-network on branch
``i``'s channels (Ozerov et al., ParaDiS; a one-branch switch is an ordinary slimmable width).
``export`` writes each ``x -> W[:, b_i] @ f_i(x)`` out as a standalone ``torch.fx.GraphModule``
of standard torch layers (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d`` with that switch's
statistics row, or folded into the conv with ``fold_bn=True``), weights copied out. Device
``i`` runs ``dep.branches[i]`` alone; only the partial logits travel, and ``dep(x)`` sums
them and adds the classifier bias once.

Branches contain no slimkern code: they save with ``torch.save(branch.state_dict())``, load
with ``torch.load(..., weights_only=True)`` and run under ``torch.export.export``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from slimkern._branch import BranchGraph
from slimkern.nn.switching import as_switch

__all__ = ["export", "Deployable"]


class Deployable(nn.Module):
    """``branches[i]``: the plain model device ``i`` runs; ``forward`` sums their partial
    outputs and adds ``bias`` (the classifier's, once) broadcast over dim 1."""

    def __init__(self, branches, bias: torch.Tensor | None, switch: str):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        if bias is not None:
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        self.switch = switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *([1] * (y.dim() - 2)))
        return y

    def extra_repr(self) -> str:
        return f"switch={self.switch}"


def _fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Folds every eval-mode BN that directly follows a conv whose only reader it is."""
    from torch.fx.experimental.optimization import fuse
    return fuse(gm.eval(), inplace=False)


def export(net: nn.Module, sw, fold_bn: bool = False) -> Deployable:
    """Plain dense per-device models of ``net`` under switch ``sw`` (eval mode).

    Args:
        net: a net of slimkern layers (``slimmify`` output, or built from ``slimkern.nn``)
            whose output is its fused classifier (``slice_in`` and not ``slice_out``).
        sw: a Switch, notation string or width. Every switchable BN must hold statistics for
            it (trained with it, or ``slimkern.calibrate_bn``); otherwise ValueError.
        fold_bn: fold each BN into the conv before it (conv bias absorbs the shift).

    Returns a ``Deployable`` in eval mode: ``dep.branches[i]`` (a ``torch.fx.GraphModule`` of
    standard layers) is what device ``i`` runs; ``dep(x)`` equals ``net`` under ``sw`` in eval
    mode. The net is not modified.
    """
    sw = as_switch(sw)
    bg = BranchGraph(net, "export")
    if not bg.slim:
        raise ValueError(f"export: {type(net).__name__} has no slimkern layers; slimmify it first")
    fused = bg.check_fusion(sw, "export")
    branches = []
    for i in range(sw.num_branches):
        gm = bg.branch(sw, i, meta=False, class_name=f"Branch{i}").eval()
        if fold_bn:
            gm = _fold_bn(gm)
        branches.append(gm)
    bias = fused.bias.detach().clone() if fused is not None and fused.bias is not None else None
    return Deployable(branches, bias, str(sw)).eval()
