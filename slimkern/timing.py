"""Wall-clock timing of repeated calls, shared by the latency measurements (``slimkern deploy``'s
benchmark, ``slimkern.nas`` latency tables).

A call is timed with ``time.perf_counter`` around it alone, after ``warmup`` untimed calls
(allocator, oneDNN primitive caches and lazy initialisation settle in the first calls). The
summary is the median (robust to the load spikes of a shared machine), the 10th / 90th
percentiles (the spread) and the minimum (AOWS's choice: other jobs only ever add time).
Percentiles are ``statistics.quantiles(n=10)``'s default *exclusive* method: the ``p``-th
percentile sits at rank ``p (n + 1)`` of the sorted times, linearly interpolated (numpy's
``method="weibull"``).
"""
from __future__ import annotations

import numbers
import statistics
import time
from typing import Callable

__all__ = ["time_calls", "timing_stats"]


def _count(v, what: str, least: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{what} must be an int >= {least}, got {v!r}")
    return int(v)


def time_calls(fn: Callable, *args, warmup: int = 0, repeats: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(*args)``, after ``warmup`` untimed calls."""
    if not callable(fn):
        raise TypeError(f"time_calls: fn must be callable, got {type(fn).__name__}")
    warmup, repeats = _count(warmup, "warmup", 0), _count(repeats, "repeats", 1)
    for _ in range(warmup):
        fn(*args)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return out


def timing_stats(times) -> dict[str, float]:
    """``{"median", "p10", "p90", "min"}`` of a list of times (a single time: all equal)."""
    ts = [float(t) for t in times]
    if not ts:
        raise ValueError("timing_stats: no times")
    med = statistics.median(ts)
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [med] * 9
    return {"median": med, "p10": q[0], "p90": q[-1], "min": min(ts)}
