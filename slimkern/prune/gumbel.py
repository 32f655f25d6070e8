"""Straight-through Gumbel-sigmoid (binary Concrete) sampling of channel masks.

For logits ``l`` and temperature ``tau`` (Maddison et al. 2017; Jang et al. 2017, the binary
case; used for masks by AutoTrainOnce and DWNP, Gao et al. eq. 3):

    u ~ U(0, 1),   g = log u - log(1 - u)          (logistic noise = difference of two Gumbels)
    y_soft = sigmoid((l + g) / tau)
    y_hard = 1[y_soft >= 0.5] = 1[l + g >= 0]

With ``hard=True`` the forward value is ``y_hard`` and the backward is the soft sample's
(straight-through): ``y = y_hard - stop_grad(y_soft) + y_soft``, so
``dy/dl = y_soft (1 - y_soft) / tau``.
"""
from __future__ import annotations

import torch

__all__ = ["gumbel_sigmoid"]

_EPS = 1e-10


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 1.0, hard: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A (straight-through) Gumbel-sigmoid sample of ``logits`` (see the module docstring).

    Args:
        logits: floating tensor of any shape.
        tau: temperature > 0 (small: samples near 0/1, high-variance gradients).
        hard: return exact 0/1 values with the soft sample's gradient.
        generator: a ``torch.Generator`` on ``logits``' device for reproducible noise.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"gumbel_sigmoid: logits must be a floating-point tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"gumbel_sigmoid: tau must be a number > 0, got {tau!r}")
    if not isinstance(hard, bool):
        raise TypeError(f"gumbel_sigmoid: hard must be a bool, got {hard!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"gumbel_sigmoid: generator must be a torch.Generator, got {type(generator).__name__}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(_EPS, 1 - _EPS)
    g = torch.log(u) - torch.log1p(-u)
    y_soft = torch.sigmoid((logits + g) / tau)
    if not hard:
        return y_soft
    y_hard = (y_soft >= 0.5).to(logits.dtype)
    return y_hard - y_soft.detach() + y_soft
