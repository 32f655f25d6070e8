"""block_conv2d side by side: slimkern C++ vs naive torch vs the dense limit (pytest-benchmark).

Providers, on the same inputs:
  slimkern  slimkern.ops.block_conv2d (C++ CPU kernels)
  naive     slice, .contiguous(), F.conv2d per block, torch.cat
  dense     F.conv2d per block on operands copied contiguous beforehand (no slicing, no cat):
            the limit a block op can approach with torch's own convolutions

Shapes: MobileNet-v1 / ResNet CIFAR layers, batch 64 (1x1, dense 3x3, depthwise 3x3 at 32x32
and 16x16). Block tables: one prefix slice (G = 1), ParaDiS [0.5, 0.5] and [0.5, 0.25, 0.25],
sandwich [1.0], [0.5], [0.25] packed. Modes: forward, forward+backward.

    python -m pytest benchmarks/bench_block_ops.py --benchmark-json=benchmarks/results/block_ops.json
    python benchmarks/summarize.py benchmarks/results/block_ops.json
SLIMKERN_BENCH_QUICK=1 runs a few shapes (< 1 min) for `make demo`.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk

QUICK = os.environ.get("SLIMKERN_BENCH_QUICK", "") not in ("", "0")

# name: (kind, channels, map size)
SHAPES = {
    "pw64@32": ("1x1", 64, 32),
    "pw256@16": ("1x1", 256, 16),
    "dw64@32": ("dw3x3", 64, 32),
    "dw256@16": ("dw3x3", 256, 16),
    "conv64@32": ("3x3", 64, 32),
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
    SHAPES = {k: SHAPES[k] for k in ("pw64@32", "dw64@32", "conv64@32")}
    TABLES = {k: TABLES[k] for k in ("prefix0.5", "paradis[.5,.5]")}
PROVIDERS = ("slimkern", "naive", "dense")
BATCH = 8 if QUICK else 64


def make_case(shape, table):
    kind, C, S = SHAPES[shape]
    dw = kind == "dw3x3"
    k = 1 if kind == "1x1" else 3
    blocks = [tuple(round(f * C) for f in row) for row in TABLES[table]]
    c_x = sum(b[1] - b[0] for b in blocks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c_x, S, S, generator=g)
    w = torch.randn(C, 1 if dw else C, k, k, generator=g) * 0.1
    b = torch.randn(C, generator=g)
    return dict(x=x, w=w, b=b, blocks=blocks, padding=k // 2, dw=dw)


def offsets(blocks):
    offs, acc = [], 0
    for i0, i1, _, _ in blocks:
        offs.append(acc)
        acc += i1 - i0
    return offs


def runner(provider, case, backward):
    x, w, b, blocks, pad, dw = case["x"], case["w"], case["b"], case["blocks"], case["padding"], case["dw"]
    offs = offsets(blocks)
    if provider == "dense":  # operands copied contiguous once, outside the timed region
        parts = []
        for (i0, i1, o0, o1), off in zip(blocks, offs):
            parts.append((x[:, off:off + i1 - i0].contiguous().requires_grad_(backward),
                          (w[o0:o1] if dw else w[o0:o1, i0:i1]).contiguous().requires_grad_(backward),
                          b[o0:o1].contiguous().requires_grad_(backward), (i1 - i0) if dw else 1))

        def fwd():
            return [F.conv2d(xg, wg, bg, 1, pad, 1, groups) for xg, wg, bg, groups in parts]
    else:
        xs, ws, bs = (t.clone().requires_grad_(backward) for t in (x, w, b))

        if provider == "slimkern":
            def fwd():
                return [sk.ops.block_conv2d(xs, ws, bs, blocks, offs, 1, pad, 1, dw, backend="cpp")]
        else:
            def fwd():
                outs = []
                for (i0, i1, o0, o1), off in zip(blocks, offs):
                    xg = xs[:, off:off + i1 - i0].contiguous()
                    wg = (ws[o0:o1] if dw else ws[o0:o1, i0:i1]).contiguous()
                    outs.append(F.conv2d(xg, wg, bs[o0:o1], 1, pad, 1, (i1 - i0) if dw else 1))
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


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_block_conv2d(benchmark, mode, shape, table, provider):
    case = make_case(shape, table)
    run = runner(provider, case, mode == "fwdbwd")
    benchmark.group = f"block_conv2d {mode} {shape} {table}"
    benchmark.extra_info.update(provider=provider, op="block_conv2d", mode=mode, shape=shape, table=table,
                                batch=BATCH, threads=torch.get_num_threads())
    run()  # warm-up (oneDNN primitive creation)
    benchmark.pedantic(run, rounds=3 if QUICK else 7, warmup_rounds=1, iterations=1)
