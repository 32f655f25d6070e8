"""Seeded random affine augmentation of a batch of small images (for ``simulate(augment=...)``).

Standard digit augmentation (small rotations, shifts and scalings, as in LeCun et al. 1998 /
Simard et al. 2003 "Best practices for convolutional neural networks applied to visual
document analysis"): per image an angle ``a ~ U(-rotate, rotate)`` degrees, a scale
``s ~ U(1 - scale, 1 + scale)`` and a shift ``(tx, ty) ~ U(-translate, translate)^2``
pixels. The output pixel at normalised position ``p`` samples the input bilinearly at
``R(a) p / s + t`` (``F.affine_grid`` / ``F.grid_sample``, ``align_corners=False``);
positions outside the image read ``fill`` (the background value of the normalised images).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["RandomAffine"]


class RandomAffine:
    """``RandomAffine(rotate=10, translate=1, scale=0.1, fill=0)(x, generator)`` -> ``x'``.

    ``x`` is ``[N, C, H, W]`` float; draws come from ``generator`` so a federated client's
    augmentation is fixed by its seed (a resumed run repeats it exactly).
    """

    def __init__(self, rotate: float = 10.0, translate: float = 1.0, scale: float = 0.1, fill: float = 0.0):
        for name, v in (("rotate", rotate), ("translate", translate), ("scale", scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RandomAffine: {name} must be a finite number >= 0, got {v!r}")
        if scale >= 1:
            raise ValueError(f"RandomAffine: scale must be < 1 (scales are 1 +- scale), got {scale}")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
            raise ValueError(f"RandomAffine: fill must be a finite number, got {fill!r}")
        self.rotate, self.translate, self.scale, self.fill = float(rotate), float(translate), float(scale), float(fill)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"RandomAffine: expected a float [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return self.warp(x, self.draw(x.shape[0], generator))

    @staticmethod
    def draw(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random numbers of ``n`` images, ``[n, 4]`` float64 in ``[-1, 1)`` (angle, scale,
        shift x, shift y): everything ``__call__`` draws from ``generator``."""
        return torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1

    def warp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The images ``x`` warped with the draws ``u`` (``draw``); image i depends on ``x[i]``
        and ``u[i]`` only, so batches can be warped together."""
        n, _, h, w = x.shape
        a = u[:, 0] * math.radians(self.rotate)
        inv_s = 1.0 / (1 + u[:, 1] * self.scale)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.cos(a) * inv_s
        theta[:, 0, 1] = -torch.sin(a) * inv_s
        theta[:, 1, 0] = torch.sin(a) * inv_s
        theta[:, 1, 1] = torch.cos(a) * inv_s
        # a shift of one pixel is 2 / size in affine_grid's [-1, 1] coordinates
        theta[:, 0, 2] = u[:, 2] * self.translate * 2 / w
        theta[:, 1, 2] = u[:, 3] * self.translate * 2 / h
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out + self.fill

    def __repr__(self) -> str:
        return (f"RandomAffine(rotate={self.rotate:g}, translate={self.translate:g}, scale={self.scale:g}, "
                f"fill={self.fill:g})")
