"""Width-multiplier baselines of equal cost (DAC's Figure 3 comparison).

A uniform width multiplier ``w`` keeps the first ``max(1, round(w * C_g))`` channels of every
width group (``slimkern.switch.round_channels``, the slimmable rounding), i.e. a MobileNet-v2
of width ``w`` carved from the same net. ``width_for_budget`` finds the largest ``w`` (to
``tol``) whose cost (``FlopsModel``: profile's closed forms) meets a budget, by bisection (cost grows with ``w``).
"""
from __future__ import annotations

import torch.nn as nn

from slimkern.prune.budget import Budget
from slimkern.prune.flops import FlopsModel
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.switch import round_channels

__all__ = ["width_keep", "width_for_budget"]


def width_keep(model: nn.Module, width: float) -> dict[str, list[int]]:
    """Kept channels of the uniform width multiplier ``width`` in (0, 1]."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ValueError(f"width_keep: width must be in (0, 1], got {width!r}")
    groups = channel_groups(as_slim_net(model, "width_keep"), "width_keep")
    return {g: list(range(max(1, round_channels(width, grp.channels)))) for g, grp in groups.items()}


def width_for_budget(model: nn.Module, budget: Budget, input_size, tol: float = 0.01) -> tuple[float, dict]:
    """``(w, keep)``: the largest uniform width meeting ``budget``; ValueError when even the
    narrowest (one channel per group) does not."""
    net = as_slim_net(model, "width_for_budget")
    fm = FlopsModel(net, input_size)

    def ok(w):
        return budget.met(*fm.hard_cost(width_keep(net, w)))

    lo, hi = 1e-6, 1.0
    if not ok(lo):
        raise ValueError(f"width_for_budget: no uniform width meets {budget}")
    if ok(hi):
        return 1.0, width_keep(net, 1.0)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, width_keep(net, lo)
