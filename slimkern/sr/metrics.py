"""PSNR as super-resolution papers report it (EDSR / WDSR evaluation code): on the luminance
Y of ITU-R BT.601, ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for RGB in [0, 1],
with ``border`` pixels (the scale) cropped from every side, the prediction clamped to [0, 1]:

.. math:: \\mathrm{PSNR} = 10 \\log_{10} \\frac{1}{\\mathrm{MSE}(Y_{sr}, Y_{hr})}
"""
from __future__ import annotations

import math

import torch

_Y = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] -> ``[N, 1, H, W]`` BT.601 luminance in [16/255, 235/255]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y: expected [N, 3, H, W], got {tuple(x.shape)}")
    w = x.new_tensor(_Y).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) + 16.0 / 255.0


def psnr(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """PSNR in dB of ``sr`` (clamped to [0, 1]) against ``hr``, peak 1, ``border`` cropped."""
    if sr.shape != hr.shape or sr.dim() != 4:
        raise ValueError(f"psnr: need two [N, C, H, W] tensors of one shape, got {tuple(sr.shape)}, {tuple(hr.shape)}")
    if border < 0 or 2 * border >= min(sr.shape[-2:]):
        raise ValueError(f"psnr: border {border} leaves no pixels of {tuple(sr.shape[-2:])}")
    b = slice(border, -border if border else None)
    d = sr.detach().clamp(0, 1)[..., b, b].double() - hr.detach()[..., b, b].double()
    mse = float(d.pow(2).mean())
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """PSNR on the luminance channel (see the module docstring)."""
    return psnr(rgb_to_y(sr.detach().clamp(0, 1)), rgb_to_y(hr.detach()), border)
