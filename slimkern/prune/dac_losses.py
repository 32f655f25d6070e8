"""DAC's gate regularisers (Li & Sanyal, "Heterogeneous Federated Learning with Differentiable
Architecture Compression", eqs. 1-2).

The training loss of DAC is ``CE + lambda1 * L_entropy + lambda2 * L_bound`` with the paper's
defaults ``lambda1 = 0.1``, ``lambda2 = 0.01`` (``DEFAULT_LAMBDA_ENTROPY``,
``DEFAULT_LAMBDA_BOUND``). ``gates`` is a list of 1-D tensors, one per block ``j`` (the gates
``w_.j`` on the input channels of that block's depthwise conv).
"""
from __future__ import annotations

import torch

__all__ = ["entropy_loss", "bound_loss", "DEFAULT_LAMBDA_ENTROPY", "DEFAULT_LAMBDA_BOUND"]

DEFAULT_LAMBDA_ENTROPY = 0.1
DEFAULT_LAMBDA_BOUND = 0.01


def _check(gates, what: str) -> list[torch.Tensor]:
    if isinstance(gates, torch.Tensor) or not isinstance(gates, (list, tuple)):
        raise TypeError(f"{what}: gates must be a list of 1-D tensors (one per block), got {type(gates).__name__}")
    if not gates:
        raise ValueError(f"{what}: gates is empty; give one 1-D tensor per gated block")
    for j, w in enumerate(gates):
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() == 0:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{what}: gates[{j}] must be a non-empty 1-D tensor, got {shape}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{what}: gates[{j}] must be floating point, got {w.dtype}")
    return list(gates)


def entropy_loss(gates) -> torch.Tensor:
    """DAC eq. 1: ``L_entropy = sum_j H(softmax(w_.j))``, ``H(p) = -sum_i p_i log p_i``.

    The softmax runs over the channels of block ``j``; a block whose gates are all equal has
    the maximal entropy ``log C_j``, one gate far above the others drives it towards 0. Computed
    with ``log_softmax`` (finite for any gate values). Returns a scalar tensor.
    """
    gates = _check(gates, "entropy_loss")
    total = gates[0].new_zeros(())
    for w in gates:
        logp = torch.log_softmax(w, 0)
        total = total - (logp.exp() * logp).sum()
    return total


def bound_loss(gates) -> torch.Tensor:
    """DAC eq. 2, the intended penalty: ``L_bound = sum_ij relu(w_ij - 1) + relu(-w_ij)``.

    It is zero for gates in ``[0, 1]`` and grows linearly outside, so gradient descent pulls a
    gate above 1 down and a negative gate up. Eq. 2 as printed in the paper carries a leading
    minus, ``-sum(...)``: minimising that would *reward* gates for leaving ``[0, 1]`` (its
    gradient pushes a gate at 1.2 further up), contradicting the text's stated purpose of
    keeping gates in range, so the sign is taken as a typo and this function returns the
    non-negative penalty. Returns a scalar tensor.
    """
    gates = _check(gates, "bound_loss")
    total = gates[0].new_zeros(())
    for w in gates:
        total = total + (torch.relu(w - 1) + torch.relu(-w)).sum()
    return total
