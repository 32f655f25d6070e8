"""block_conv2d side by side: slimkern C++ vs naive torch vs the dense limit (pytest-benchmark).

Providers, on the same inputs:
  slimkern  slimkern.ops.block_conv2d (C++ CPU kernels)
  naive     slice, .contiguous(), F.conv2d per block, torch.cat
  dense     F.conv2d per block on operands copied contiguous beforehand (no slicing, no cat):
            the limit a block op can approach with torch's own convolutions

Shapes: MobileNet-v1 / ResNet CIFAR layers, batch 64: 1x1, dense 3x3 and depthwise 3x3 at
C = 32 .. 512 on 32x32 and 16x16 maps, and a stride-2 depthwise layer (256 ch, 32x32 -> 16x16).
Block tables: one prefix slice (G = 1), ParaDiS [0.5, 0.5] and [0.5, 0.25, 0.25], sandwich
[1.0], [0.5], [0.25] packed. Modes: forward, forward+backward. The full set runs in about 2-5 minutes on 2 cores:

    PYTHONPATH=. python benchmarks/bench_block_ops.py --json benchmarks/results/block_ops.json \
        --budget 6 --max-rounds 41
    python -m pytest benchmarks/bench_block_ops.py -q --benchmark-json=benchmarks/results/block_ops_pytest.json
    python benchmarks/summarize.py benchmarks/results/block_ops.json --targets

Clock: wall time (perf_counter) on an otherwise idle machine. Every provider runs with glibc
keeping freed memory for reuse (benchmarks/_process.py): under glibc's defaults a fresh
buffer above 32 MiB page-faults on every call, which on this VM costs as much as the kernels.
With OMP_WAIT_POLICY=PASSIVE set, every parallel region pays a thread wake-up; do not set it
for these timings. On a machine shared with other jobs, `--timer process` (CPU time of all
threads) is steadier than wall time.
Threads: SLIMKERN_BENCH_THREADS (default 2). Rounds adapt to the cost of one call (about 1 s
of rounds per benchmark, 3 to 15 rounds). SLIMKERN_BENCH_QUICK=1 runs a few shapes (< 1 min)
for `make demo`.

pytest-benchmark times one provider after another, so a load swing between them lands in the
ratio. `python benchmarks/bench_block_ops.py --json PATH` times the same cases with the
providers interleaved round by round (rotating order) and writes the same JSON layout
(groups, extra_info, stats), which summarize.py reads; its ratios are the ones to quote.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk
from _process import setup_allocator, write_results

QUICK = os.environ.get("SLIMKERN_BENCH_QUICK", "") not in ("", "0")
THREADS = int(os.environ.get("SLIMKERN_BENCH_THREADS", "2"))
MALLOC = setup_allocator()

# name: (kind, channels, map size[, stride])
SHAPES = {
    "pw32@32": ("1x1", 32, 32),
    "pw64@32": ("1x1", 64, 32),
    "pw128@32": ("1x1", 128, 32),
    "pw256@16": ("1x1", 256, 16),
    "pw512@16": ("1x1", 512, 16),
    "dw32@32": ("dw3x3", 32, 32),
    "dw128@32": ("dw3x3", 128, 32),
    "dw512@16": ("dw3x3", 512, 16),
    "dw256@32s2": ("dw3x3", 256, 32, 2),  # MobileNet-v1's stride-2 depthwise layers
    "conv16@32": ("3x3", 16, 32),    # ResNet-20's first stage
    "conv32@32": ("3x3", 32, 32),
    "conv128@16": ("3x3", 128, 16),
}
# name: list of (in_lo, in_hi, out_lo, out_hi) in fractions of C
TABLES = {
    "prefix0.5": [(0, 0.5, 0, 0.5)],
    "paradis[.5,.5]": [(0, 0.5, 0, 0.5), (0.5, 1.0, 0.5, 1.0)],
    "paradis[.5,.25,.25]": [(0, 0.5, 0, 0.5), (0.5, 0.75, 0.5, 0.75), (0.75, 1.0, 0.75, 1.0)],
    "sandwich[1,.5,.25]": [(0, 1.0, 0, 1.0), (0, 0.5, 0, 0.5), (0, 0.25, 0, 0.25)],
}
if QUICK:
    SHAPES = {k: SHAPES[k] for k in ("pw64@32", "dw32@32", "conv32@32")}
    TABLES = {k: TABLES[k] for k in ("prefix0.5", "paradis[.5,.5]")}
PROVIDERS = ("slimkern", "naive", "dense")
BATCH = 8 if QUICK else 64
ROUND_BUDGET_S = 0.3 if QUICK else 1.0


def make_case(shape, table):
    kind, C, S = SHAPES[shape][:3]
    stride = SHAPES[shape][3] if len(SHAPES[shape]) > 3 else 1
    dw = kind == "dw3x3"
    k = 1 if kind == "1x1" else 3
    blocks = [tuple(round(f * C) for f in row) for row in TABLES[table]]
    c_x = sum(b[1] - b[0] for b in blocks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c_x, S, S, generator=g)
    w = torch.randn(C, 1 if dw else C, k, k, generator=g) * 0.1
    b = torch.randn(C, generator=g)
    return dict(x=x, w=w, b=b, blocks=blocks, padding=k // 2, dw=dw, stride=stride)


def offsets(blocks):
    offs, acc = [], 0
    for i0, i1, _, _ in blocks:
        offs.append(acc)
        acc += i1 - i0
    return offs


def runner(provider, case, backward):
    x, w, b, blocks, pad, dw, st = (case[k] for k in ("x", "w", "b", "blocks", "padding", "dw", "stride"))
    offs = offsets(blocks)
    if provider == "dense":  # operands copied contiguous once, outside the timed region
        parts = []
        for (i0, i1, o0, o1), off in zip(blocks, offs):
            parts.append((x[:, off:off + i1 - i0].contiguous().requires_grad_(backward),
                          (w[o0:o1] if dw else w[o0:o1, i0:i1]).contiguous().requires_grad_(backward),
                          b[o0:o1].contiguous().requires_grad_(backward), (i1 - i0) if dw else 1))

        def fwd():
            return [F.conv2d(xg, wg, bg, st, pad, 1, groups) for xg, wg, bg, groups in parts]
    else:
        xs, ws, bs = (t.clone().requires_grad_(backward) for t in (x, w, b))

        if provider == "slimkern":
            def fwd():
                return [sk.ops.block_conv2d(xs, ws, bs, blocks, offs, st, pad, 1, dw, backend="cpp")]
        else:
            def fwd():
                outs = []
                for (i0, i1, o0, o1), off in zip(blocks, offs):
                    xg = xs[:, off:off + i1 - i0].contiguous()
                    wg = (ws[o0:o1] if dw else ws[o0:o1, i0:i1]).contiguous()
                    outs.append(F.conv2d(xg, wg, bs[o0:o1], st, pad, 1, (i1 - i0) if dw else 1))
                return [torch.cat(outs, 1)]
    if not backward:
        def run():
            with torch.no_grad():
                return fwd()
        return run
    grads = [torch.ones_like(o) for o in fwd()]

    def run():
        outs = fwd()
        torch.autograd.backward(outs, grads)
        return outs
    return run


def rounds_for(run):
    """Warm up (oneDNN primitive creation, allocator) and size the rounds to the call's cost."""
    run()
    t = time.perf_counter()
    run()
    once = time.perf_counter() - t
    return max(3, min(15, int(ROUND_BUDGET_S / max(once, 1e-6))))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_block_conv2d(benchmark, mode, shape, table, provider):
    torch.set_num_threads(THREADS)
    case = make_case(shape, table)
    run = runner(provider, case, mode == "fwdbwd")
    benchmark.group = f"block_conv2d {mode} {shape} {table}"
    benchmark.extra_info.update(provider=provider, op="block_conv2d", mode=mode, shape=shape, table=table,
                                kind=SHAPES[shape][0], G=len(TABLES[table]), batch=BATCH,
                                threads=torch.get_num_threads(),
                                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"), malloc=MALLOC)
    benchmark.pedantic(run, rounds=rounds_for(run), warmup_rounds=0, iterations=1)


def main(argv=None):
    """Interleaved runner: every round times each provider once, in rotating order."""
    ap = argparse.ArgumentParser(description="block_conv2d providers timed interleaved")
    ap.add_argument("--json", required=True, help="output file (pytest-benchmark layout)")
    ap.add_argument("--timer", choices=("process", "wall"), default="wall",
                    help="process: CPU time of all threads (shared machines); wall: perf_counter")
    ap.add_argument("--budget", type=float, default=2.5, help="seconds of rounds per group")
    ap.add_argument("--max-rounds", type=int, default=15, help="rounds per group at most (at least 3)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tables", nargs="*", default=list(TABLES))
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwdbwd"])
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    timer = time.process_time if args.timer == "process" else time.perf_counter
    benches = []
    for mode in args.modes:
        for shape in args.shapes:
            for table in args.tables:
                case = make_case(shape, table)
                runs = {p: runner(p, case, mode == "fwdbwd") for p in PROVIDERS}
                t0 = time.perf_counter()
                for run in runs.values():
                    run()
                    run()
                once = (time.perf_counter() - t0) / 2
                rounds = max(3, min(args.max_rounds, int(args.budget / max(once, 1e-6))))
                data = {p: [] for p in PROVIDERS}
                for r in range(rounds):
                    order = PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[:r % len(PROVIDERS)]
                    for p in order:
                        t = timer()
                        runs[p]()
                        data[p].append(timer() - t)
                group = f"block_conv2d {mode} {shape} {table}"
                for p in PROVIDERS:
                    d = data[p]
                    benches.append(dict(
                        group=group, name=f"test_block_conv2d[{mode}-{shape}-{table}-{p}]",
                        params=dict(mode=mode, shape=shape, table=table, provider=p),
                        extra_info=dict(provider=p, op="block_conv2d", mode=mode, shape=shape, table=table,
                                        kind=SHAPES[shape][0], G=len(TABLES[table]), batch=BATCH,
                                        threads=torch.get_num_threads(), interleaved=True,
                                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"), malloc=MALLOC),
                        options=dict(timer=f"time.{'process_time' if args.timer == 'process' else 'perf_counter'}"),
                        stats=dict(min=min(d), max=max(d), mean=statistics.fmean(d), median=statistics.median(d),
                                   rounds=len(d), data=d)))
                med = {p: statistics.median(data[p]) for p in PROVIDERS}
                print(f"{group:55s} " + "  ".join(f"{p} {med[p] * 1e3:8.2f} ms" for p in PROVIDERS)
                      + f"  vs naive {med['naive'] / med['slimkern']:.2f}x  vs dense {med['dense'] / med['slimkern']:.2f}x",
                      flush=True)
    write_results(args.json, benches, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
