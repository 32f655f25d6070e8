"""``SlimWNConv2d``: a weight-normalised conv whose norm runs over the switch's active inputs.

Weight normalisation (Salimans & Kingma, NeurIPS 2016) writes each output filter as
``w_o = g_o * v_o / ||v_o||``. WDSR (Yu et al., "Wide Activation for Efficient and Accurate
Image Super-Resolution") uses it instead of batch norm. In a slimmable / ParaDiS net a filter
only reads the input channels its switch activates, so the norm must run over *those*
channels, not over the whole allocated weight:

.. math::  W_b[o] = g_o \\, \\frac{v[o, I_b]}{\\lVert v[o, I_b] \\rVert_2}
           \\quad (\\text{norm over } I_b \\times k_h \\times k_w)

where ``I_b`` is the input range of branch ``b`` (its own channels; the whole image for an
unsliced input). Then a branch of a switch is *exactly* a plain conv under
``torch.nn.utils.parametrizations.weight_norm`` holding ``g[out_b]`` and ``v[out_b, I_b]``.

A *fused* layer (sliced input, unsliced output: the last conv, whose branches' partial outputs
are summed) normalises each output filter over every input channel the switch reads, the union
``I = I_0 U I_1 U ...``, since every branch contributes to every output:
``out = sum_b conv(x_b, g * v[:, I_b] / ||v[:, I]||) + bias``, which equals the weight-normed
conv on the concatenated branch features (the ParaDiS fusion). The norm is a constant of the
trained weights, so a deployed branch stores its effective weight and needs nothing from the
other devices.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from slimkern.nn._base import ChannelMixin

__all__ = ["SlimWNConv2d"]


class SlimWNConv2d(ChannelMixin, nn.Module):
    """Weight-normalised 2-d convolution over the channel blocks of the current plan.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d`` (``groups=1`` only; base 1.0x channel counts).
        max_width, divisor, slice_in, slice_out, in_group, out_group: as ``SlimConv2d``.

    Parameters: ``weight_v`` ``[C_out_full, C_in_full, kh, kw]`` (direction), ``weight_g``
    ``[C_out_full]`` (magnitude, 1-D: no weight decay, like torch's BN/bias convention) and
    ``bias``. At init ``g`` is the norm of ``v`` over the *base* (1.0x) inputs, so
    ``Switch([1.0])`` starts as the plain conv ``v`` (torch's ``weight_norm`` does the same).

    Forward: see the module docstring; ``effective_weight(in_ranges)`` is the dense weight a
    switch's block uses.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, max_width: float = 1.0, divisor: int = 1, slice_in: bool = True,
                 slice_out: bool = True, in_group: str | None = None, out_group: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(padding, str):
            raise ValueError("SlimWNConv2d takes numeric padding (string padding modes are not supported)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self._init_geometry(in_channels, out_channels, max_width, divisor, slice_in, slice_out, in_group, out_group)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        fk = {"device": device, "dtype": dtype}
        self.weight_v = nn.Parameter(torch.empty(self.out_full, self.in_full, *self.kernel_size, **fk))
        self.weight_g = nn.Parameter(torch.empty(self.out_full, **fk))
        self.bias = nn.Parameter(torch.empty(self.out_full, **fk)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, **kw) -> "SlimWNConv2d":
        """A SlimWNConv2d whose 1.0x prefix holds ``conv``'s ``g`` and ``v`` when ``conv`` is under
        ``torch.nn.utils.parametrizations.weight_norm`` (dim 0), else ``v = conv.weight`` and
        ``g = ||v||``; so ``Switch([1.0])`` computes exactly ``conv``. ``kw``: the geometry
        arguments of the constructor."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense takes an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SlimWNConv2d.from_dense needs groups=1, numeric zero padding")
        par = getattr(conv, "parametrizations", None)
        if par is not None and "weight" in par:
            g, v = par.weight.original0.detach(), par.weight.original1.detach()
            if g.shape != (v.shape[0], 1, 1, 1):
                raise ValueError(f"weight_norm must normalise over dim 0 (g of shape [C_out, 1, 1, 1]), "
                                 f"got g of shape {tuple(g.shape)}")
            g = g.flatten()
        else:
            v = conv.weight.detach()
            g = v.flatten(1).norm(dim=1)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.bias is not None, device=v.device, dtype=v.dtype, **kw)
        with torch.no_grad():
            o, i = v.shape[:2]
            m.weight_v[:o, :i].copy_(v)
            m.weight_g[:o].copy_(g)
            if conv.bias is not None:
                m.bias[:o].copy_(conv.bias)
        return m

    def reset_parameters(self) -> None:
        # nn.Conv2d's init with the base fan-in; g = ||v|| over the base inputs.
        bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight_v, -bound, bound)
        base_in = self.in_channels if self.slice_in else self.in_full
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v[:, :base_in].flatten(1).norm(dim=1))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def effective_weight(self, in_range: tuple[int, int], out_range: tuple[int, int],
                         norm_ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """``g[out] * v[out, in] / ||v[out, norm_ranges]||``, the dense weight of one block.

        ``norm_ranges`` (default ``[in_range]``) are the input ranges the norm runs over (a
        fused layer passes every range its switch reads)."""
        (i0, i1), (o0, o1) = in_range, out_range
        if not (0 <= i0 < i1 <= self.in_full and 0 <= o0 < o1 <= self.out_full):
            raise ValueError(f"block in={in_range} out={out_range} outside the weight "
                             f"[{self.out_full}, {self.in_full}]")
        v = self.weight_v[o0:o1]
        sq = sum(v[:, a:b].pow(2).sum(dim=(1, 2, 3)) for a, b in (norm_ranges or [in_range]))
        scale = self.weight_g[o0:o1] / sq.sqrt()
        return v[:, i0:i1] * scale.view(-1, 1, 1, 1)

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SlimWNConv2d expects a 4-d input [N, C, H, W], got shape {tuple(x.shape)}")
        _, t = self._sk_current()
        self._check_input(x, t, "SlimWNConv2d")
        mode, blocks = t["mode"], t["blocks"]
        if mode == "plain":
            full = (0, self.in_full)
            return self._conv(x, self.effective_weight(full, (0, self.out_full)), self.bias)
        if t["x_offsets"] is not None:  # unsliced input: every block reads the whole image
            xs = [x] * len(blocks)
        else:
            xs = x.split([i1 - i0 for i0, i1, _, _ in blocks], 1)
        if mode == "blocks":
            outs = [self._conv(xg, self.effective_weight((i0, i1), (o0, o1)),
                               self.bias[o0:o1] if self.bias is not None else None)
                    for xg, (i0, i1, o0, o1) in zip(xs, blocks)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        # fused: per switch, the norm runs over the union of its blocks' inputs
        self._capture(x, t)
        outs = []
        for g0, g1 in t["segments"]:
            norm_ranges = [(blocks[g][0], blocks[g][1]) for g in range(g0, g1)]
            y = None
            for g in range(g0, g1):
                i0, i1, o0, o1 = blocks[g]
                w = self.effective_weight((i0, i1), (o0, o1), norm_ranges)
                part = self._conv(xs[g], w, None)
                y = part if y is None else y + part
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1)
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s + self._geometry_repr() + ", weight_norm"
