"""``SlimLinear``: a linear layer allocated for ``max_width`` and run on channel blocks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimkern.nn._base import ChannelMixin
from slimkern.nn._ops import op


class SlimLinear(ChannelMixin, nn.Module):
    """Linear layer over the channel blocks of the current plan.

    Args as ``nn.Linear`` plus ``max_width``, ``divisor``, ``slice_in``, ``slice_out``,
    ``in_group``, ``out_group`` (see ``SlimConv2d``). A classifier is
    ``SlimLinear(C, num_classes, slice_out=False)``: each branch computes partial logits
    ``W[:, branch] @ feat_branch``; a switch's logits are their sum plus the bias once
    (the ParaDiS fusion), stacked along the batch ``[S*N, num_classes]`` for S switches.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, max_width: float = 1.0,
                 divisor: int = 1, slice_in: bool = True, slice_out: bool = True, in_group: str | None = None,
                 out_group: str | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_channels, self.out_channels = in_features, out_features
        self._init_geometry(in_features, out_features, max_width, divisor, slice_in, slice_out,
                            in_group, out_group)
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_full, self.in_full, **fk))
        self.bias = nn.Parameter(torch.empty(self.out_full, **fk)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, max_width: float = 1.0, divisor: int = 1, slice_in: bool = True,
                   slice_out: bool = True, in_group: str | None = None, out_group: str | None = None
                   ) -> "SlimLinear":
        """A SlimLinear whose 1.0x prefix holds ``linear``'s weights (see SlimConv2d.from_dense)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense takes an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, max_width=max_width,
                divisor=divisor, slice_in=slice_in, slice_out=slice_out, in_group=in_group, out_group=out_group,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            o, i = linear.weight.shape
            m.weight[:o, :i].copy_(linear.weight)
            if linear.bias is not None:
                m.bias[:o].copy_(linear.bias)
        return m

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's init with the base fan-in
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SlimLinear expects a 2-d input [N, C], got shape {tuple(x.shape)} "
                             "(flatten first)")
        _, t = self._sk_current()
        self._check_input(x, t, "SlimLinear")
        mode = t["mode"]
        if mode == "plain":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if mode == "fuse":
            self._capture(x, t)
            if len(t["blocks"]) == 1:
                return op("block_linear")(x, self.weight, self.bias, t["blocks"], None)
            return self._fuse(op("block_linear")(x, self.weight, None, t["blocks"], None), self.bias, t)
        return op("block_linear")(x, self.weight, self.bias, t["blocks"], t["x_offsets"])

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        return s + self._geometry_repr()
