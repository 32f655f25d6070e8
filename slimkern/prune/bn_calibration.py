"""Re-estimating BN running statistics of a plain (pruned) model on local data.

A pruned sub-network sees different inputs to its BNs than the shared net whose statistics it
inherited (other channels upstream are gone), so its statistics are recomputed: reset, then
``num_batches`` forward passes in train mode with ``momentum=None`` (a cumulative average, as
``slimkern.calibrate_bn`` does for switches), no gradients, parameters untouched.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int = 10) -> nn.Module:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate_bn: num_batches must be an int >= 1, got {num_batches!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= num_batches:
                break
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return model
