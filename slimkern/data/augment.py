"""Standard CIFAR augmentation (He et al. 2016): 4-pixel zero padding, random 32x32 crop,
random horizontal flip — on tensors, for one image ``[C, H, W]`` or a batch ``[N, C, H, W]``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``padding`` zeros, crop back to ``H x W`` at a random offset per image, and
    flip each image left-right with probability 1/2.

    Offsets ``(dy, dx)`` are uniform in ``[0, 2 * padding]``; draws come from ``generator``
    (or the global torch RNG) so runs are reproducible by seed.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"random_crop_flip: expected [C,H,W] or [N,C,H,W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"random_crop_flip: padding must be >= 0, got {padding}")
    single = x.dim() == 3
    xb = x.unsqueeze(0) if single else x
    n, c, h, w = xb.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(xb, (padding, padding, padding, padding)) if padding else xb
    # Gather rows and columns with index arithmetic: one op for the whole batch, no Python loop per image.
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)            # [N, H]
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)                            # [N, W]
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols).to(x.device)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, padded.shape[3]))
    out = out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return out[0] if single else out


class CifarAugment:
    """Callable transform: ``CifarAugment(padding=4, flip=True)(x)`` -> augmented tensor."""

    def __init__(self, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None):
        self.padding, self.flip, self.generator = padding, flip, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_crop_flip(x, self.padding, self.flip, self.generator)

    def __repr__(self) -> str:
        return f"CifarAugment(padding={self.padding}, flip={self.flip})"
