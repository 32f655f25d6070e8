"""Argument normalisation and validation shared by the block ops (``block_conv2d``,
``block_linear``): block tables, x offsets, conv geometry, backend choice.

Every check raises with a message that names the argument and the problem, before any
kernel runs; the C++ kernels check the same things again (``TORCH_CHECK``).
"""
from __future__ import annotations

import functools
import importlib
import operator
from typing import Sequence

import torch

from slimkern import _library

BACKENDS = ("auto", "cpp", "triton", "torch")

# The kernels index with int64; a geometry value this large has no meaning and its arithmetic
# (``H + 2 * padding``, ``offset + size``) could overflow there.
GEOMETRY_MAX = 2**31 - 1


def as_index(v, what: str) -> int:
    """An integer (Python, numpy or 0-d integer tensor) as ``int``; floats (even ``6.0``),
    bools and strings are refused, as ``operator.index`` does, so nothing is truncated."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise TypeError(f"{what} must be an integer, got the bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {v!r} ({type(v).__name__})") from None


def int_tensor_list(t: torch.Tensor, what: str) -> list:
    """An integer tensor's values as a nested list; float, complex and bool tensors are refused."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {t.dtype}")
    return t.tolist()


def normalize_blocks(blocks, in_extent: int, out_extent: int, *, depthwise: bool = False) -> list[int]:
    """A ``[G, 4]`` table (int tensor or list of 4-tuples) -> flat list of ``G*4`` ints, checked
    against the weight's ``in_extent`` input and ``out_extent`` output channels."""
    if hasattr(blocks, "__array__") and not isinstance(blocks, torch.Tensor):  # numpy
        blocks = torch.as_tensor(blocks)
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[1] != 4:
            int_tensor_list(blocks, "blocks")
            raise ValueError(f"blocks must have shape [G, 4] (in_start, in_stop, out_start, out_stop), "
                             f"got {tuple(blocks.shape)}")
        rows = int_tensor_list(blocks, "blocks")
    elif isinstance(blocks, (list, tuple)):
        rows = []
        for g, row in enumerate(blocks):
            if isinstance(row, torch.Tensor) or hasattr(row, "__array__"):
                row = int_tensor_list(torch.as_tensor(row), f"blocks[{g}]")
            if not isinstance(row, (list, tuple)) or len(row) != 4:
                raise ValueError(f"blocks[{g}] must be a 4-tuple (in_start, in_stop, out_start, out_stop), "
                                 f"got {row!r}")
            rows.append(row)
    else:
        raise TypeError(f"blocks must be a [G, 4] int tensor or a list of 4-tuples, got {type(blocks).__name__}")
    int_rows = [tuple(as_index(v, f"blocks[{g}] entry") for v in row) for g, row in enumerate(rows)]
    return check_block_rows(int_rows, in_extent, out_extent, depthwise=depthwise)


def check_block_rows(rows: Sequence[Sequence[int]], in_extent: int, out_extent: int, *, depthwise: bool = False,
                     op: str | None = None) -> list[int]:
    """Checks rows of 4 ints ``(in_start, in_stop, out_start, out_stop)`` against the weight's
    ``in_extent`` input and ``out_extent`` output channels; returns them flat (``G*4`` ints).
    ``op`` prefixes the messages (``"block_conv2d: ..."``) for callers below the public wrapper."""
    where = f"{op}: " if op else ""
    if len(rows) == 0:
        raise ValueError(f"{where}blocks is empty: at least one block (G >= 1) is required")
    flat: list[int] = []
    for g, (i0, i1, o0, o1) in enumerate(rows):
        if not (0 <= i0 <= i1 <= in_extent):
            raise ValueError(f"{where}block {g}: input range [{i0}, {i1}) is not inside the weight's {in_extent} "
                             f"input channels (or stop < start)")
        if not (0 <= o0 <= o1 <= out_extent):
            raise ValueError(f"{where}block {g}: output range [{o0}, {o1}) is not inside the weight's "
                             f"{out_extent} output channels (or stop < start)")
        if i1 == i0 or o1 == o0:
            raise ValueError(f"{where}block {g} is empty: ({i0}, {i1}, {o0}, {o1})")
        if depthwise and (i0, i1) != (o0, o1):
            raise ValueError(f"{where}block {g}: a depthwise block needs equal input and output ranges, "
                             f"got [{i0}, {i1}) and [{o0}, {o1})")
        flat += [i0, i1, o0, o1]
    return flat


def normalize_x_offsets(x_offsets, blocks_flat: Sequence[int], x_channels: int) -> list[int]:
    """``None`` packs the blocks' inputs one after another; otherwise one offset per block,
    each window ``[off, off + in_size)`` inside x's ``x_channels`` channels."""
    if x_offsets is None:
        offs, acc = [], 0
        for g in range(len(blocks_flat) // 4):
            offs.append(acc)
            acc += blocks_flat[4 * g + 1] - blocks_flat[4 * g]
    else:
        if isinstance(x_offsets, torch.Tensor) or hasattr(x_offsets, "__array__"):
            x_offsets = int_tensor_list(torch.as_tensor(x_offsets).reshape(-1), "x_offsets")
        offs = [as_index(v, f"x_offsets[{g}]") for g, v in enumerate(x_offsets)]
    check_x_offsets(offs, blocks_flat, x_channels)
    return offs


def check_x_offsets(offs: Sequence[int], blocks_flat: Sequence[int], x_channels: int, *,
                    op: str | None = None) -> None:
    """One offset per block, each window ``[off, off + in_size)`` inside x's ``x_channels`` channels."""
    where = f"{op}: " if op else ""
    G = len(blocks_flat) // 4
    if len(offs) != G:
        raise ValueError(f"{where}x_offsets has {len(offs)} entries but there are {G} blocks")
    for g, off in enumerate(offs):
        hi = off + blocks_flat[4 * g + 1] - blocks_flat[4 * g]
        if off < 0 or hi > x_channels:
            raise ValueError(f"{where}block {g} reads input channels [{off}, {hi}) but x has {x_channels} "
                             f"channels: x's channel count does not match the blocks")


def pair(value, name: str, *, minimum: int) -> list[int]:
    """An int or a pair of ints -> ``[h, w]``, each at least ``minimum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = [value, value]
    elif isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        out = [value[0], value[-1]]
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(out) > GEOMETRY_MAX:
        raise ValueError(f"{name} must be at most {GEOMETRY_MAX}, got {value!r}")
    return out


def check_tensors(x, weight, bias, *, x_rank: int, w_rank: int, op: str) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
    if x.dim() != x_rank:
        raise ValueError(f"{op}: x has the wrong rank: expected a {x_rank}-d tensor, got shape {tuple(x.shape)}")
    if weight.dim() != w_rank:
        raise ValueError(f"{op}: weight has the wrong rank: expected a {w_rank}-d tensor, "
                         f"got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        if t.device != x.device:
            raise ValueError(f"{op}: x and {name} must be on the same device, got {x.device} and {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape [{weight.shape[0]}] (the weight's output channels), "
                         f"got {tuple(bias.shape)}")


def choose_backend(backend, x: torch.Tensor, op: str) -> str:
    """Resolves ``backend`` (None/"auto", "cpp", "triton", "torch") for the device of ``x``.

    auto: CPU tensors -> C++; CUDA tensors -> Triton when importable and it takes the
    inputs (``not_supported_reasons``: e.g. float64 is not), else the C++ CUDA kernel; the
    pure-torch path when the extension has no kernel for the device.
    """
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend != "auto":
        return backend
    if x.device.type == "cuda":
        tri = triton_module(op, required=False)
        if tri is not None and not tri.not_supported_reasons(x):
            return "triton"
    if _library.has_op(op) and _has_kernel(op, x.device.type):
        return "cpp"
    return "torch"


@torch.compiler.assume_constant_result
def _has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a ``device_type`` kernel for ``slimkern::<op>``.

    torch.compile folds this to a constant: the dispatcher query returns a bool, which Dynamo
    cannot put in a graph (without the mark every op call was a graph break)."""
    return _has_kernel_cached(op, device_type)


@functools.lru_cache(maxsize=None)
def _has_kernel_cached(op: str, device_type: str) -> bool:
    # Cached: the loaded extension's registrations do not change, and the dispatcher query
    # cost 20-40 us per op call on a busy 2-core machine (a tenth of a small conv).
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"slimkern::{op}", key))
    except RuntimeError:
        return False


def triton_module(op: str, *, required: bool = True):
    """``slimkern.triton.<op>``, imported lazily (a CPU-only install never needs triton)."""
    try:
        return importlib.import_module(f"slimkern.triton.{op}")
    except ImportError as exc:
        if required:
            raise RuntimeError(f"backend='triton' for {op} is not available: {exc}") from exc
        return None
