r"""Triton kernels of ``slimkern.ops.block_linear`` (forward and the three gradients).

Block :math:`g` computes :math:`y[:, b_g + j] = \beta[o_0 + j] + \sum_k x[:, a_g + k]\, W[o_0 + j, i_0 + k]`.
A linear layer is a 1x1 convolution on a 1x1 map, so these run the dense implicit-GEMM
kernels of :mod:`slimkern.triton.block_conv2d` on zero-copy views ``x[:, :, None, None]``
and ``W[:, :, None, None]`` (strides carried over; the weight slice is never copied).
With a 1x1 map the pixel index is the batch row and the gathers reduce to plain strided
tile loads, so the kernels are ordinary tiled GEMMs. float32 products use TF32 only when
torch allows it for matmuls (``torch.backends.cuda.matmul.allow_tf32``), like ``F.linear``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from slimkern.triton import block_conv2d as _conv
from slimkern.triton._blocks import not_supported_reasons

__all__ = ["forward", "backward", "not_supported_reasons"]


def _rank2(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} has the wrong rank: got a {t.dim()}-d tensor with shape {tuple(t.shape)}")


def _tf32(allow_tf32: bool | None) -> bool:
    return torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, blocks_flat: Sequence[int],
            x_offsets: Sequence[int], *, allow_tf32: bool | None = None) -> torch.Tensor:
    """The packed output ``[N, sum(out_stop - out_start)]`` of all blocks."""
    _rank2("block_linear", "x", x)
    _rank2("block_linear", "weight", weight)
    y = _conv._forward("block_linear", x[:, :, None, None], weight[:, :, None, None], bias, blocks_flat, x_offsets,
                      1, 0, 1, False, allow_tf32=_tf32(allow_tf32))
    return y[:, :, 0, 0]


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks_flat: Sequence[int],
             x_offsets: Sequence[int], output_mask: Sequence[bool] = (True, True, True), *,
             allow_tf32: bool | None = None):
    """``(grad_x, grad_weight, grad_bias)``; an output whose mask entry is false is an empty tensor."""
    op = "block_linear_backward"
    _rank2(op, "x", x)
    _rank2(op, "weight", weight)
    _rank2(op, "grad_out", grad_out)
    gx, gw, gb = _conv._backward(op, grad_out[:, :, None, None], x[:, :, None, None], weight[:, :, None, None],
                                blocks_flat, x_offsets, 1, 0, 1, False, output_mask,
                                allow_tf32=_tf32(allow_tf32))
    gx = gx.reshape(x.shape) if gx.dim() == 4 else gx  # a masked-off gradient stays the empty tensor
    gw = gw.reshape(weight.shape) if gw.dim() == 4 else gw
    return gx, gw, gb
