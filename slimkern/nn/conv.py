"""``SlimConv2d``: a conv whose weight is allocated for ``max_width`` and run on channel blocks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from slimkern.nn._base import ChannelMixin
from slimkern.nn._ops import op


class SlimConv2d(ChannelMixin, nn.Module):
    """2-d convolution over the channel blocks of the current plan.

    Args:
        in_channels, out_channels: base (1.0x) channel counts.
        kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        groups: 1, or ``in_channels == out_channels`` for a depthwise conv (each channel its
            own filter; input and output are sliced alike). Other groupings cannot be sliced.
        max_width: the widest fraction the layer must run (``Switch([1.2])`` needs 1.2);
            sliced sides are allocated ``round(max_width * C)`` channels.
        divisor: channel boundaries are multiples of it (``Switch.channel_ranges``).
        slice_in / slice_out: False for a side whose channel count is fixed (the image input;
            a classifier's outputs). A layer with ``slice_in`` and not ``slice_out`` *fuses*
            branches: per switch, the sum of the branches' partial outputs plus the bias once,
            stacked along the batch ``[S*N, C_out, H, W]``.
        in_group / out_group: channel group names (per-layer switches, ``Switch.from_channels``).

    Forward: block g computes ``conv(x_g, weight[out_g, in_g]) + bias[out_g]`` with
    ``slimkern.ops.block_conv2d``; outputs are packed along channels in block order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, max_width: float = 1.0, divisor: int = 1,
                 slice_in: bool = True, slice_out: bool = True, in_group: str | None = None,
                 out_group: str | None = None, device=None, dtype=None):
        super().__init__()
        self.depthwise = groups != 1
        if self.depthwise and not (groups == in_channels == out_channels):
            raise ValueError(f"SlimConv2d supports groups=1 or depthwise (groups == in_channels == out_channels); "
                             f"got groups={groups}, in_channels={in_channels}, out_channels={out_channels}: "
                             "a grouped conv with several channels per group cannot be sliced")
        if self.depthwise and slice_in != slice_out:
            raise ValueError("a depthwise SlimConv2d slices input and output alike: slice_in must equal slice_out")
        if isinstance(padding, str):
            raise ValueError("SlimConv2d takes numeric padding (string padding modes are not supported)")
        self.in_channels, self.out_channels = in_channels, out_channels
        if self.depthwise:  # one channel group: input and output channels are the same ones
            in_group = out_group = out_group or in_group
        self._init_geometry(in_channels, out_channels, max_width, divisor, slice_in, slice_out,
                            in_group, out_group)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups = groups
        fk = {"device": device, "dtype": dtype}
        w_in = 1 if self.depthwise else self.in_full
        self.weight = nn.Parameter(torch.empty(self.out_full, w_in, *self.kernel_size, **fk))
        self.bias = nn.Parameter(torch.empty(self.out_full, **fk)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, max_width: float = 1.0, divisor: int = 1, slice_in: bool = True,
                   slice_out: bool = True, in_group: str | None = None, out_group: str | None = None
                   ) -> "SlimConv2d":
        """A SlimConv2d whose 1.0x prefix holds ``conv``'s weights (the rest keeps the fresh init),
        so ``Switch([1.0])`` computes exactly ``conv`` (used by ``slimmify``)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense takes an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"cannot slice a conv with padding_mode={conv.padding_mode!r} (only 'zeros')")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, max_width=max_width, divisor=divisor, slice_in=slice_in,
                slice_out=slice_out, in_group=in_group, out_group=out_group, device=conv.weight.device,
                dtype=conv.weight.dtype)
        with torch.no_grad():
            o, i = conv.weight.shape[:2]
            m.weight[:o, :i].copy_(conv.weight)
            if conv.bias is not None:
                m.bias[:o].copy_(conv.bias)
        return m

    def reset_parameters(self) -> None:
        # nn.Conv2d's init with the *base* fan-in, so a slice starts like a plain conv of that size.
        fan_in = (1 if self.depthwise else self.in_channels) * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def windows(self, sw):
        if self.depthwise:
            r = self.out_ranges(sw)
            return list(zip(r, r))
        return super().windows(sw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SlimConv2d expects a 4-d input [N, C, H, W], got shape {tuple(x.shape)}")
        _, t = self._sk_current()
        self._check_input(x, t, "SlimConv2d")
        mode = t["mode"]
        if mode == "plain":
            return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                              self.dilation, self.groups)
        if mode == "fuse":
            self._capture(x, t)
            if len(t["blocks"]) == 1:
                return op("block_conv2d")(x, self.weight, self.bias, t["blocks"], None, self.stride,
                                          self.padding, self.dilation, self.depthwise)
            y = op("block_conv2d")(x, self.weight, None, t["blocks"], None, self.stride, self.padding,
                                   self.dilation, self.depthwise)
            return self._fuse(y, self.bias, t)
        return op("block_conv2d")(x, self.weight, self.bias, t["blocks"], t["x_offsets"], self.stride,
                                  self.padding, self.dilation, self.depthwise)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + self._geometry_repr()
