"""``block_linear``: several linear maps on slices of one shared weight, in one call.

For a block table with rows ``(in_start, in_stop, out_start, out_stop)`` and input offsets
``x_offsets``, block ``g`` computes

    y_g = x[:, o_g : o_g + (in_stop - in_start)] @ W[out_start:out_stop, in_start:in_stop]^T
          + b[out_start:out_stop]

and the output is ``cat([y_0, ..., y_{G-1}], dim=1)``. It is the fully connected layer of a
slimmable / ParaDiS network (Yu et al. 2019; Ozerov et al.) running several widths or
branches in one call. For ParaDiS fusion a branch's partial logits are ``W[:, branch] @ feat``:
a block with the full output range and a partial input range. Overlapping blocks sum their
weight gradients.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from slimkern import _library
from slimkern.ops._blocks import check_tensors, choose_backend, normalize_blocks, normalize_x_offsets, \
    triton_module

__all__ = ["block_linear"]

_OP = "block_linear"


def block_linear(x, weight, bias, blocks, x_offsets=None, backend=None):
    """Linear maps of ``x``'s feature windows with slices of ``weight``, packed along features.

    Args:
        x: ``[N, C_x]``; block ``g`` reads features ``[x_offsets[g], x_offsets[g] + in_size_g)``.
        weight: the full shared weight ``[C_out, C_in]``.
        bias: the full ``[C_out]`` or None.
        blocks: ``[G, 4]`` int tensor or list of 4-tuples ``(in_start, in_stop, out_start, out_stop)``.
        x_offsets: one offset per block; None packs the blocks' inputs one after another.
        backend: None/"auto", "cpp", "triton" or "torch".

    Returns:
        ``[N, sum_g out_size_g]``.
    """
    check_tensors(x, weight, bias, x_rank=2, w_rank=2, op=_OP)
    flat = normalize_blocks(blocks, weight.shape[1], weight.shape[0])
    offs = normalize_x_offsets(x_offsets, flat, x.shape[1])
    which = choose_backend(backend, x, _OP)
    if which == "torch":
        return _torch_path(x, weight, bias, flat, offs)
    if which == "triton":
        return torch.ops.slimkern.block_linear_triton(x, weight, bias, flat, offs)
    return _library.require_op(_OP)(x, weight, bias, flat, offs)


def _torch_path(x, weight, bias, flat, offs):
    outs = []
    for g, off in enumerate(offs):
        i0, i1, o0, o1 = flat[4 * g: 4 * g + 4]
        outs.append(F.linear(x[:, off:off + i1 - i0], weight[o0:o1, i0:i1], None if bias is None else bias[o0:o1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _fake_forward(x, weight, bias, blocks, x_offsets):
    c_out = sum(blocks[4 * g + 3] - blocks[4 * g + 2] for g in range(len(blocks) // 4))
    return x.new_empty((x.shape[0], c_out))


def _fake_backward(grad_out, x, weight, blocks, x_offsets, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,)))


# The Triton kernels as ops of their own (not an autograd.Function around Python launches), so
# torch.compile keeps them opaque, like the C++ ones: one graph on CUDA too.
@torch.library.custom_op("slimkern::block_linear_triton", mutates_args=())
def _triton_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], blocks: List[int],
                    x_offsets: List[int]) -> torch.Tensor:
    return triton_module(_OP).forward(x, weight, bias, blocks, x_offsets)


@torch.library.custom_op("slimkern::block_linear_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, blocks: List[int],
                     x_offsets: List[int], output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gw, gb = triton_module(_OP).backward(grad_out.contiguous(), x, weight, blocks, x_offsets, output_mask)
    # a masked-off gradient comes back as one shared empty tensor; an op's outputs must not alias
    return tuple(t if on else t.new_empty((0,)) for t, on in zip((gx, gw, gb), output_mask))


def _triton_setup_context(ctx, inputs, output):
    x, weight, bias, blocks, x_offsets = inputs
    ctx.save_for_backward(x, weight)
    ctx.args, ctx.has_bias = (blocks, x_offsets), bias is not None


def _triton_autograd(ctx, grad_out):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.slimkern.block_linear_triton_backward(grad_out, x, weight, *ctx.args, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_triton_autograd, setup_context=_triton_setup_context)

if _library.has_op(_OP):
    torch.library.register_fake("slimkern::block_linear")(_fake_forward)
    torch.library.register_fake("slimkern::block_linear_backward")(_fake_backward)

    # Autograd is registered in C++ (csrc/ops/autograd/block_linear.cpp): its backward is the
    # block_linear_backward op above.
