"""The small federated pieces both pruning methods share: local SGD, weighted averaging of
state dicts (McMahan et al. 2017, FedAvg), accuracy.

Averaging: floating-point entries are ``sum_k w_k x_k / sum_k w_k``; integer entries (BN's
``num_batches_tracked``) and non-tensors are taken from the first state. All states must have
the same keys and shapes (one architecture: a DAC cluster, or DWNP's shared net).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["average_states", "local_sgd", "accuracy"]


def average_states(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """Weighted mean of state dicts (module docstring)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"average_states: need one weight per state, got {len(states)} states, {len(weights)} weights")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"average_states: weights must be >= 0 with a positive sum, got {list(weights)}")
    w = w / w.sum()
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise ValueError(f"average_states: state {i} has different keys than state 0")
    out = {}
    for k in keys:
        v0 = states[0][k]
        if isinstance(v0, torch.Tensor) and v0.dtype.is_floating_point:
            for i, s in enumerate(states):
                if s[k].shape != v0.shape:
                    raise ValueError(f"average_states: {k!r} has shape {tuple(s[k].shape)} in state {i}, "
                                     f"{tuple(v0.shape)} in state 0")
            acc = torch.zeros_like(v0, dtype=torch.float64)
            for wi, s in zip(w, states):
                acc += wi * s[k].detach().to(torch.float64)
            out[k] = acc.to(v0.dtype)
        else:
            out[k] = v0.clone() if isinstance(v0, torch.Tensor) else v0
    return out


def local_sgd(model: nn.Module, loader: Iterable, epochs: int, lr: float, momentum: float,
              forward: Callable[[torch.Tensor], torch.Tensor] | None = None, weight_decay: float = 0.0) -> float:
    """``epochs`` of SGD with cross-entropy on ``loader``; ``forward`` (default ``model``) lets
    a caller run the model under masks. Returns the mean training loss. A batch of a single sample
    (the remainder of a small client's data) is skipped: BN cannot train on it."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"local_sgd: epochs must be an int >= 0, got {epochs!r}")
    if not lr > 0 or not 0 <= momentum < 1:
        raise ValueError(f"local_sgd: need lr > 0 and momentum in [0, 1), got {lr!r}, {momentum!r}")
    fwd = forward or model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total, n = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            if len(y) < 2:  # a batch of one cannot train BN (variance of one value at 1x1 maps): skipped
                continue
            loss = F.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
    return total / max(n, 1)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, forward: Callable | None = None) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    fwd = forward or model
    was = model.training
    model.eval()
    right = n = 0
    try:
        for x, y in loader:
            right += int((fwd(x).argmax(1) == y).sum())
            n += len(y)
    finally:
        model.train(was)
    return right / max(n, 1)
