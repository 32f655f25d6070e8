"""``block_conv2d``: several convolutions on slices of one shared weight, in one call.

For a block table with rows ``(in_start, in_stop, out_start, out_stop)`` and input offsets
``x_offsets``, block ``g`` computes

    y_g = conv2d(x[:, o_g : o_g + (in_stop - in_start)],
                 W[out_start:out_stop, in_start:in_stop], b[out_start:out_stop])

and the output is ``cat([y_0, ..., y_{G-1}], dim=1)``. Depthwise (``W`` is ``[C, 1, kh, kw]``):
in and out ranges are equal and channel ``c`` is filtered by ``W[c]`` alone.

This is the layer of a slimmable network (Yu et al., "Slimmable Neural Networks", ICLR 2019)
running several widths at once (the sandwich rule of "Universally Slimmable Networks", Yu &
Huang, ICCV 2019), and of a ParaDiS network (Ozerov et al.) running its parallel branches on
disjoint channel ranges: one op call per layer instead of one per switch. Blocks may overlap in
weight space; the weight gradient is the sum over blocks.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from slimkern import _library
from slimkern.ops._blocks import check_tensors, choose_backend, normalize_blocks, normalize_x_offsets, pair, \
    triton_module

__all__ = ["block_conv2d"]

_OP = "block_conv2d"


def block_conv2d(x, weight, bias, blocks, x_offsets=None, stride=1, padding=0, dilation=1, depthwise=False,
                 backend=None):
    """Convolutions of ``x``'s channel windows with slices of ``weight``, packed along channels.

    Args:
        x: ``[N, C_x, H, W]``; block ``g`` reads channels ``[x_offsets[g], x_offsets[g] + in_size_g)``.
        weight: the full shared weight ``[C_out, C_in, kh, kw]`` (``[C, 1, kh, kw]`` when depthwise).
        bias: the full ``[C_out]`` or None.
        blocks: ``[G, 4]`` int tensor or list of 4-tuples ``(in_start, in_stop, out_start, out_stop)``.
        x_offsets: one channel offset per block; None packs the blocks' inputs one after another;
            all zeros make every block read the same input.
        stride, padding, dilation: as in ``F.conv2d`` (int or pair).
        depthwise: each channel has its own filter (``groups = channels``).
        backend: None/"auto", "cpp", "triton" or "torch" (pure-torch slicing path).

    Returns:
        ``[N, sum_g out_size_g, H_out, W_out]``.
    """
    check_tensors(x, weight, bias, x_rank=4, w_rank=4, op=_OP)
    if not isinstance(depthwise, bool):
        raise TypeError(f"{_OP}: depthwise must be a bool, got {depthwise!r}")
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"{_OP}: a depthwise weight must have shape [C, 1, kh, kw], got {tuple(weight.shape)}")
    in_extent = weight.shape[0] if depthwise else weight.shape[1]
    flat = normalize_blocks(blocks, in_extent, weight.shape[0], depthwise=depthwise)
    offs = normalize_x_offsets(x_offsets, flat, x.shape[1])
    stride = pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    for axis in range(2):
        span = dilation[axis] * (weight.shape[2 + axis] - 1) + 1
        if x.shape[2 + axis] + 2 * padding[axis] < span:
            raise ValueError(f"{_OP}: the input ({tuple(x.shape[2:])} plus padding {padding}) is smaller than "
                             f"the dilated kernel ({span} along axis {axis})")
    which = choose_backend(backend, x, _OP)
    if which == "torch":
        return _torch_path(x, weight, bias, flat, offs, stride, padding, dilation, depthwise)
    if which == "triton":
        return torch.ops.slimkern.block_conv2d_triton(x, weight, bias, flat, offs, stride, padding, dilation,
                                                      depthwise)
    op = _library.require_op(_OP)
    return op(x, weight, bias, flat, offs, stride, padding, dilation, depthwise)


def _torch_path(x, weight, bias, flat, offs, stride, padding, dilation, depthwise):
    """Slice, conv per block, cat: the fallback when the extension is missing (autograd by torch)."""
    outs = []
    for g, off in enumerate(offs):
        i0, i1, o0, o1 = flat[4 * g: 4 * g + 4]
        xg = x[:, off:off + i1 - i0]
        wg = weight[o0:o1] if depthwise else weight[o0:o1, i0:i1]
        bg = None if bias is None else bias[o0:o1]
        outs.append(F.conv2d(xg, wg, bg, stride, padding, dilation, groups=(i1 - i0) if depthwise else 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _fake_forward(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise):
    c_out = sum(blocks[4 * g + 3] - blocks[4 * g + 2] for g in range(len(blocks) // 4))
    ho = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = _out_size(x.shape[3], weight.shape[3], stride[-1], padding[-1], dilation[-1])
    return x.new_empty((x.shape[0], c_out, ho, wo))


def _fake_backward(grad_out, x, weight, blocks, x_offsets, stride, padding, dilation, depthwise, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,)))


# The Triton kernels as ops of their own (not an autograd.Function around Python launches), so
# torch.compile keeps them opaque, like the C++ ones: one graph on CUDA too.
@torch.library.custom_op("slimkern::block_conv2d_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], blocks: List[int],
                    x_offsets: List[int], stride: List[int], padding: List[int], dilation: List[int],
                    depthwise: bool) -> torch.Tensor:
    return triton_module(_OP).forward(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise)


@torch.library.custom_op("slimkern::block_conv2d_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks: List[int],
                     x_offsets: List[int], stride: List[int], padding: List[int], dilation: List[int],
                     depthwise: bool, output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gw, gb = triton_module(_OP).backward(grad_out.contiguous(), x, weight, blocks, x_offsets, stride, padding,
                                             dilation, depthwise, output_mask)
    # a masked-off gradient comes back as one shared empty tensor; an op's outputs must not alias
    return tuple(t if on else t.new_empty((0,)) for t, on in zip((gx, gw, gb), output_mask))


def _triton_setup_context(ctx, inputs, output):
    x, weight, bias, *args = inputs
    ctx.save_for_backward(x, weight)
    ctx.args, ctx.has_bias = args, bias is not None


def _triton_autograd(ctx, grad_out):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.slimkern.block_conv2d_triton_backward(grad_out, x, weight, *ctx.args, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None, None)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_triton_autograd, setup_context=_triton_setup_context)

if _library.has_op(_OP):
    torch.library.register_fake("slimkern::block_conv2d")(_fake_forward)
    torch.library.register_fake("slimkern::block_conv2d_backward")(_fake_backward)

    # Autograd is registered in C++ (csrc/ops/autograd/block_conv2d.cpp): its backward is the
    # block_conv2d_backward op above.
