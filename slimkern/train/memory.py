"""``keep_freed_memory``: let glibc recycle freed activation buffers instead of unmapping them.

Why: glibc's ``malloc`` serves a request above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB
on 64-bit) with a fresh ``mmap`` and unmaps it on ``free``, so every page of such a buffer
page-faults on first touch, every training step again. A packed multi-switch pass
(:func:`slimkern.forward_switches`) holds the activations of all switches in one tensor per
layer, well above 32 MiB at batch 64: the MobileNet-v1 ParaDiS step of
``benchmarks/bench_train_step.py`` took 430k minor page faults per step (0.8 s of system time,
1.15 s per step) under glibc's defaults and none (0.75 s) with this setting; a fresh 64 MiB
buffer cost 30 ms to allocate and fill against 2 ms for a recycled one on the 2-core VM we
measure on. PyTorch's CPU performance guide gives the same advice in the form of jemalloc or
tcmalloc. The cost: memory freed by the process stays mapped (its RSS keeps its peak).

This changes the process's allocator, so it is never done on import: ``slimkern train`` and
``slimkern demo`` call it (``--no-keep-freed-memory`` to opt out), library users call it
explicitly.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MAX_INT = 2**31 - 1


def keep_freed_memory(max_block_mb: int = 1024) -> bool:
    """Serves allocations of up to ``max_block_mb`` MiB from glibc's heap and never trims it,
    so freed tensors' pages are reused without page faults. Returns True when applied, False
    where the C library is not glibc (nothing changes there).

    Args:
        max_block_mb: the largest single allocation (MiB) kept on the heap; larger ones are
            still mmap'd. 1 to 2047.
    """
    if isinstance(max_block_mb, bool) or not isinstance(max_block_mb, int):
        raise TypeError(f"max_block_mb must be an int, got {type(max_block_mb).__name__}")
    if not 1 <= max_block_mb <= 2047:
        raise ValueError(f"max_block_mb must be in [1, 2047] (MiB), got {max_block_mb}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the threshold first, so a refusal changes nothing.
    if mallopt(_M_MMAP_THRESHOLD, max_block_mb * 1024 * 1024) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1
