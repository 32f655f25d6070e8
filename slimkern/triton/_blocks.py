"""Argument handling shared by the Triton block kernels (no triton import here).

Mirrors the C++ checks in ``csrc/include/slimkern/checks.h`` so the Triton path
refuses the same bad inputs with the same words, before any kernel runs; the block
table and x_offsets checks are the public wrapper's (:mod:`slimkern.ops._blocks`),
prefixed with the op's name.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch

from slimkern.ops._blocks import check_block_rows, check_x_offsets

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BlockRun(NamedTuple):
    """One block of a call: weight ranges plus where its channels live in x and in the output."""

    in_start: int
    in_size: int
    out_start: int
    out_size: int
    x_off: int
    y_off: int


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(x: torch.Tensor, weight: torch.Tensor | None = None) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty list: they can)."""
    reasons = []
    if x.device.type != "cuda" and not interpreting():
        reasons.append(f"Triton kernels need CUDA tensors (got {x.device}; "
                       "CPU tensors only under TRITON_INTERPRET=1)")
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the Triton kernels "
                       f"(supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)})")
    if weight is not None and weight.dtype != x.dtype:
        reasons.append(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    return reasons


def flat_ints(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    try:
        return [int(v) for v in values]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from exc


def pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value,)
    value = flat_ints(value, name)
    if len(value) not in (1, 2):
        raise ValueError(f"{name} must have 1 or 2 entries, got {len(value)}")
    return (value[0], value[-1])


def parse_blocks(blocks_flat, x_offsets, in_extent: int, out_extent: int, x_channels: int,
                 op: str, *, depthwise: bool = False) -> list[BlockRun]:
    """Checks a flat block table (G*4 ints) and x_offsets; returns one BlockRun per block."""
    flat = flat_ints(blocks_flat, "blocks")
    if len(flat) % 4 != 0:
        raise ValueError(f"{op}: blocks must have 4 entries per block (in_start, in_stop, out_start, "
                         f"out_stop); got {len(flat)} numbers")
    rows = [flat[4 * g:4 * g + 4] for g in range(len(flat) // 4)]
    check_block_rows(rows, in_extent, out_extent, depthwise=depthwise, op=op)
    offsets = flat_ints(x_offsets, "x_offsets")
    check_x_offsets(offsets, flat, x_channels, op=op)
    runs, y_off = [], 0
    for (i0, i1, o0, o1), x_off in zip(rows, offsets):
        runs.append(BlockRun(i0, i1 - i0, o0, o1 - o0, x_off, y_off))
        y_off += o1 - o0
    return runs


def check_tensors(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rank: int, grad_out: torch.Tensor | None = None) -> None:
    if x.dim() != rank:
        raise ValueError(f"{op}: x has the wrong rank: got a {x.dim()}-d tensor with shape {tuple(x.shape)}")
    if weight.dim() != rank:
        raise ValueError(f"{op}: weight has the wrong rank: got a {weight.dim()}-d tensor with shape "
                         f"{tuple(weight.shape)}")
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else []) + \
        ([("grad_out", grad_out)] if grad_out is not None else [])
    for name, t in others:
        if t.device != x.device:
            raise RuntimeError(f"{op}: x and {name} must be on the same device, got {x.device} and {t.device}")
        if t.dtype != x.dtype:
            raise RuntimeError(f"{op}: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape [{weight.shape[0]}] (the weight's output channels), "
                         f"got {tuple(bias.shape)}")
    reasons = not_supported_reasons(x, weight)
    if reasons:
        raise RuntimeError(f"{op} (Triton): " + "; ".join(reasons))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def mask_of(output_mask: Sequence[bool]) -> tuple[bool, bool, bool]:
    mask = tuple(bool(m) for m in output_mask)
    if len(mask) != 3:
        raise ValueError(f"output_mask must have 3 entries (grad_x, grad_weight, grad_bias), got {len(mask)}")
    return mask
