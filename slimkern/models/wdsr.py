"""WDSR (Yu et al., "Wide Activation for Efficient and Accurate Image Super-Resolution", 2018/2020)
as a slimmable / ParaDiS super-resolution net (ParaDiS, Ozerov et al., Appendix D).

WDSR-A: every conv is weight-normalised (no batch norm); residual blocks have *wide
activation*: ``x + res_scale * conv3x3(relu(conv3x3(x, C -> e*C)), e*C -> C)`` with expansion
``e`` (the paper's width multiplier, 4); the output is a pixel shuffle of a conv to
``3 * r^2`` channels plus a global skip (a 5x5 conv of the input, also pixel-shuffled)::

    x' = x - mean
    y  = PS(tail(body(head(x'))) + skip(x')) + mean            (PS: pixel shuffle by r)

Slicing: the feature width ``C`` (group ``"feat"``, shared by every block output through
the residual adds) and each block's wide activation (``"b<i>.mid"``) are sliced; the image
input of ``head``/``skip`` and the ``3 r^2`` outputs of ``tail``/``skip`` never are. ``tail``
is the fused layer: under a ParaDiS switch each branch contributes the partial output
``tail_b(h_b)`` and the sum (plus the bias once) is the whole tail. ``skip`` reads only the
image, so it is the same for every switch: a deployment computes it once, with the bias,
where the partial outputs are fused.

The weight norm of a sliced conv runs over the switch's active input channels
(``SlimWNConv2d``), so a ParaDiS branch is exactly a small WDSR on its own channels.
"""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import scaled
from slimkern.nn import SlimNet, SlimWNConv2d

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # the mean WDSR's reference code subtracts


class WDSRBlock(nn.Module):
    """Wide-activation residual block: ``x + res_scale * conv2(relu(conv1(x)))``."""

    def __init__(self, feats: int, expansion: int, res_scale: float, wn, name: str):
        super().__init__()
        mid = f"{name}.mid"
        self.conv1 = wn(feats, feats * expansion, 3, in_group="feat", out_group=mid)
        self.conv2 = wn(feats * expansion, feats, 3, in_group=mid, out_group="feat")
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(x))) * self.res_scale


class WDSR(SlimNet):
    """Slimmable / ParaDiS WDSR-A.

    Args:
        scale: upsampling factor ``r`` (pixel shuffle).
        n_feats: feature width at 1.0x before ``width_mult`` (the paper: 64).
        n_blocks: residual blocks (the paper: 8).
        expansion: wide-activation multiplier (the paper: 4).
        max_width: widest switch (1.2 for a wide teacher); width_mult: scales ``n_feats``.
        in_channels: image channels (3). res_scale: residual branch scale.
        divisor: channel boundaries are multiples of it.
        init: ``"default"`` (every conv as ``nn.Conv2d``, the reference code) or ``"bicubic"``:
            the skip conv starts as bicubic interpolation (its phase filters, see
            ``bicubic_skip_kernel``) and the tail's magnitudes ``g`` at zero, so the untrained
            net *is* bicubic upsampling and training learns the residual (a short-training
            choice; the architecture is unchanged).

    Input ``[N, C, H, W]`` in [0, 1]; output ``[S*N, C, rH, rW]`` for the ``S`` switches of
    the current plan (``slimkern.forward_switches`` splits it per switch).
    """

    def __init__(self, scale: int = 2, n_feats: int = 64, n_blocks: int = 8, expansion: int = 4,
                 max_width: float = 1.0, width_mult: float = 1.0, in_channels: int = 3, res_scale: float = 1.0,
                 divisor: int = 1, rgb_mean=DIV2K_RGB_MEAN, init: str = "default"):
        super().__init__()
        if init not in ("default", "bicubic"):
            raise ValueError(f"WDSR: init must be 'default' or 'bicubic', got {init!r}")
        for name, v in (("scale", scale), ("n_feats", n_feats), ("n_blocks", n_blocks), ("expansion", expansion),
                        ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WDSR: {name} must be a positive int, got {v!r}")
        if len(rgb_mean) != in_channels:
            raise ValueError(f"WDSR: rgb_mean has {len(rgb_mean)} values for {in_channels} channels")
        self.scale, self.n_blocks, self.expansion = scale, n_blocks, expansion
        self.feats = scaled(n_feats, width_mult, divisor)
        self.out_feats = in_channels * scale * scale

        def wn(cin, cout, k, **kw):
            return SlimWNConv2d(cin, cout, k, padding=k // 2, max_width=max_width, divisor=divisor, **kw)

        self.head = wn(in_channels, self.feats, 3, slice_in=False, out_group="feat")
        self.body = nn.Sequential(*[WDSRBlock(self.feats, expansion, res_scale, wn, f"b{i}") for i in range(n_blocks)])
        self.tail = wn(self.feats, self.out_feats, 3, slice_out=False, in_group="feat")
        self.skip = wn(in_channels, self.out_feats, 5, slice_in=False, slice_out=False)
        self.shuffle = nn.PixelShuffle(scale)
        self.register_buffer("rgb_mean", torch.tensor(rgb_mean, dtype=torch.float32).view(1, -1, 1, 1))
        if init == "bicubic":
            with torch.no_grad():
                v = bicubic_skip_kernel(scale, in_channels, self.skip.kernel_size[0])
                self.skip.weight_v.copy_(v)
                self.skip.weight_g.copy_(v.flatten(1).norm(dim=1))
                self.skip.bias.zero_()
                self.tail.weight_g.zero_()
                self.tail.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.rgb_mean
        s = self.skip(x)
        y = self.tail(self.body(self.head(x)))
        # a packed pass stacks S switches along the batch; the skip is the same for all of them
        y = y + s.repeat(y.shape[0] // x.shape[0], 1, 1, 1)
        return self.shuffle(y) + self.rgb_mean

    def branch_macs(self, sw, height: int, width: int) -> dict:
        """Multiply-accumulates of ``sw`` on one ``height x width`` low-resolution image.

        Returns ``{"branches": [MACs of branch b], "fusion": MACs done once where the
        branches are fused (the image skip conv), "total", "max_device"}``; ``max_device``
        counts the fusion on the busiest device (the one that also fuses). Closed forms per
        conv: ``H * W * C_out * C_in * k^2``; pixel shuffle, ReLU and adds are free (the
        papers' convention).
        """
        from slimkern.nn.switching import as_switch

        sw = as_switch(sw)
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise ValueError(f"branch_macs: height and width must be positive ints, got {height!r}, {width!r}")
        hw = height * width
        convs = [self.head, self.tail] + [c for b in self.body for c in (b.conv1, b.conv2)]
        per = [0] * sw.num_branches
        for m in convs:
            k = m.kernel_size[0] * m.kernel_size[1]
            for b, ((i0, i1), (o0, o1)) in enumerate(m.windows(sw)):
                per[b] += hw * (o1 - o0) * (i1 - i0) * k
        fusion = hw * self.skip.out_full * self.skip.in_full * self.skip.kernel_size[0] * self.skip.kernel_size[1]
        return {"branches": per, "fusion": fusion, "total": sum(per) + fusion, "max_device": max(per) + fusion}


def bicubic_skip_kernel(scale: int, channels: int = 3, k: int = 5) -> torch.Tensor:
    """Conv weight ``[C r^2, C, k, k]`` whose pixel-shuffled output is ``F.interpolate(x,
    scale_factor=r, mode="bicubic", align_corners=False)`` away from the borders: the response
    of the interpolation to a unit impulse, read per output phase ``(dy, dx)`` into the
    channel ``c r^2 + dy r + dx`` that ``PixelShuffle`` sends to pixel ``(r i + dy, r j + dx)``."""
    import torch.nn.functional as F

    n, c0 = 4 * k + 3, (4 * k + 3) // 2
    d = torch.zeros(1, 1, n, n, dtype=torch.float64)
    d[0, 0, c0, c0] = 1.0
    up = F.interpolate(d, scale_factor=scale, mode="bicubic", align_corners=False)[0, 0]
    w = torch.zeros(scale, scale, k, k, dtype=torch.float64)
    h = k // 2
    for dy in range(scale):
        for dx in range(scale):
            for a in range(k):
                for b in range(k):  # out(r i + dy) reads x[i + a - h]: the impulse sits at i = c0 - a + h
                    w[dy, dx, a, b] = up[scale * (c0 - a + h) + dy, scale * (c0 - b + h) + dx]
    if not torch.allclose(w.sum(dim=(2, 3)), torch.ones(scale, scale, dtype=torch.float64), atol=1e-6):
        raise ValueError(f"bicubic_skip_kernel: a {k}x{k} kernel cannot hold bicubic x{scale}")
    out = torch.zeros(channels * scale * scale, channels, k, k)
    for c in range(channels):
        out[c * scale * scale:(c + 1) * scale * scale, c] = w.reshape(scale * scale, k, k).float()
    return out


def wdsr(num_classes: int | None = None, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
         scale: int = 2, n_feats: int = 64, n_blocks: int = 8, expansion: int = 4, **kw) -> WDSR:
    """``slimkern.models.build("wdsr", max_width=1.0, width_mult=0.25, n_blocks=4)``.

    ``num_classes`` is ignored (``build`` passes one to every model; WDSR outputs images)."""
    return WDSR(scale, n_feats, n_blocks, expansion, max_width, width_mult, in_channels, **kw)


__all__ = ["WDSR", "WDSRBlock", "wdsr"]
