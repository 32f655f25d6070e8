"""``calibrate_bn``: recompute BN statistics of switches from data (Yu & Huang 2019, BN calibration)."""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from slimkern.nn.batchnorm import _SwitchableBatchNorm
from slimkern.nn.switching import _mods, as_switch, forward_switches, register_switches


def calibrate_bn(net: nn.Module, loader: Iterable, switches: Sequence, num_batches: int | None = None) -> int:
    """Recomputes each switch's BN running statistics as the cumulative average
    (``momentum=None``: ``mu = (1/K) sum_k mu_k``, same for the unbiased variance) over the
    first ``num_batches`` batches of ``loader`` (all if None), all switches in one packed pass
    per batch.

    The switches' rows are reset first, so stale statistics cannot survive; weights and
    affine parameters are not touched (no gradients); dropout and other modules run in eval
    mode; every module's train/eval flag and BN momentum are restored afterwards.
    ``loader`` yields tensors or tuples whose first item is the input. Returns the number of
    batches used. Raises ValueError if the loader yields no batch.
    """
    sws = [as_switch(s) for s in switches]
    if not sws:
        raise ValueError("calibrate_bn needs at least one switch")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    bns = [m for _, m in _mods(net) if isinstance(m, _SwitchableBatchNorm)]
    if not bns:
        raise ValueError(f"{type(net).__name__} has no switchable BN layers to calibrate")
    register_switches(net, sws)
    modes = [(m, m.training) for m in net.modules()]
    momenta = [(m, m.momentum) for m in bns]
    param = next(net.parameters(), None)
    device = param.device if param is not None else None
    used = 0
    try:
        net.eval()
        for m in bns:
            m.train()
            m.momentum = None
            for sw in sws:
                m.reset_switch_stats(sw)
        with torch.no_grad():
            for batch in loader:
                if num_batches is not None and used >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"calibrate_bn: the loader must yield tensors or (input, ...) tuples, "
                                    f"got {type(x).__name__}")
                forward_switches(net, x.to(device) if device is not None else x, sws)
                used += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for m, mom in momenta:
            m.momentum = mom
    if used == 0:
        raise ValueError("calibrate_bn: the loader yielded no batch")
    # Calibration must never silently do nothing: every row must have seen every batch.
    names = {id(m): n for n, m in net.named_modules()}
    stale = [f"{names[id(m)]} {sw}" for m in bns for sw in sws
             if int(m.num_batches_tracked[m.switch_row(sw)]) != used]
    if stale:
        warnings.warn(f"calibrate_bn: these BN layers/switches were not updated on every batch (not reached "
                      f"by the forward pass?): {stale}", RuntimeWarning, stacklevel=2)
    return used
