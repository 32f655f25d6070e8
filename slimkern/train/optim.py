r"""SGD with Nesterov momentum and weight decay, and the papers' learning-rate schedules.

Schedules are per iteration (the US-Nets / ParaDiS recipes decay every step):

- ``"cosine"``: :math:`\eta_t = \eta_0 \cdot \tfrac12(1 + \cos(\pi t / T))`;
- ``"linear"``: :math:`\eta_t = \eta_0 (1 - t/T)`;
- ``"step"``: :math:`\eta_0 \gamma^{k}` with ``k`` the number of ``milestones`` (in epochs) passed;
- ``"constant"``.

An optional linear warm-up over ``warmup_epochs`` multiplies any of them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "step", "constant")


def make_optimizer(net: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = True, decay_norm_and_bias: bool = False) -> torch.optim.SGD:
    """SGD over ``net``'s parameters. By default BN affine parameters and biases (1-D tensors)
    get no weight decay, as in the slimmable-network recipes."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    decay, no_decay = [], []
    for p in net.parameters():
        if p.requires_grad:
            (decay if (p.dim() > 1 or decay_norm_and_bias) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def lr_factor(schedule: str, step: int, total_steps: int, steps_per_epoch: int,
              milestones=(), gamma: float = 0.1, warmup_epochs: float = 0.0) -> float:
    """The multiplier of the base learning rate at iteration ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    t = min(step, total_steps) / max(1, total_steps)
    if schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "linear":
        f = 1.0 - t
    elif schedule == "step":
        epoch = step / max(1, steps_per_epoch)
        f = gamma ** sum(1 for m in milestones if epoch >= m)
    else:
        f = 1.0
    warm = warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        f *= (step + 1) / warm
    return f


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, steps_per_epoch: int,
                   milestones=(), gamma: float = 0.1, warmup_epochs: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(schedule, 0, total_steps, steps_per_epoch, milestones, gamma, warmup_epochs)  # validates
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(schedule, s, total_steps, steps_per_epoch, milestones, gamma, warmup_epochs))
