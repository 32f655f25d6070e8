"""Process set-up shared by the benchmarks.

glibc unmaps every freed buffer above its mmap threshold (at most 32 MiB), so a benchmark of
large activations under the default allocator times first-touch page faults as much as the
kernels: on the 2-core VM these results come from, a fresh 64 MiB buffer costs 30 ms to fill
against 2 ms for a recycled one, and which provider pays depends on allocation sizes (packed
tensors are the large ones). Every benchmark therefore runs with freed memory kept for reuse
(``slimkern.train.keep_freed_memory``, the setting ``slimkern train`` uses), for all providers
alike, and records it as ``malloc`` in each result's extra_info. SLIMKERN_BENCH_MALLOC=default
measures glibc's defaults instead.
"""
from __future__ import annotations

import json
import os
import platform
import time

from slimkern.train.memory import keep_freed_memory


def setup_allocator() -> str:
    """'kept' when glibc now recycles freed buffers, else 'default'."""
    if os.environ.get("SLIMKERN_BENCH_MALLOC", "keep") == "default":
        return "default"
    return "kept" if keep_freed_memory() else "default"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_results(path: str, benches: list[dict], threads: int) -> None:
    """Writes interleaved results in pytest-benchmark's JSON layout (what summarize.py reads),
    atomically."""
    import torch

    from slimkern import _library

    out = dict(machine_info=dict(cpu=dict(brand_raw=cpu_name()), python=platform.python_version(),
                                 torch=torch.__version__, threads=threads,
                                 slimkern_cpu_capability=_library.cpu_capability()),
               datetime=time.strftime("%Y-%m-%dT%H:%M:%S"), benchmarks=benches)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def interleaved(runs: dict, rounds: int, sync=None) -> tuple[dict, dict]:
    """Times every ``runs[provider]()`` once per round, in an order rotating by one each round
    (a load swing then lands on every provider alike, not in one provider's ratio); ``sync``
    (e.g. ``torch.cuda.synchronize``) runs inside each timing. Returns ``(cpu, wall)``: per
    provider the list of ``process_time`` and ``perf_counter`` seconds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(runs)
    cpu, wall = {p: [] for p in names}, {p: [] for p in names}
    for r in range(rounds):
        for p in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[p]()
            if sync is not None:
                sync()
            cpu[p].append(time.process_time() - c0)
            wall[p].append(time.perf_counter() - t0)
    return cpu, wall


def interleaved_entry(group: str, name: str, params: dict, extra_info: dict, wall: list, cpu: list) -> dict:
    """One result of :func:`interleaved` in pytest-benchmark's layout (what summarize.py reads)."""
    import statistics

    return dict(group=group, name=name, params=params,
                extra_info=dict(extra_info, interleaved=True, cpu_median_s=statistics.median(cpu)),
                options=dict(timer="time.perf_counter"),
                stats=dict(min=min(wall), max=max(wall), mean=statistics.fmean(wall), median=statistics.median(wall),
                           rounds=len(wall), data=wall))
