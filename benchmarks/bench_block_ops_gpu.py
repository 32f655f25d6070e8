"""block_conv2d on a GPU, side by side (pytest-benchmark; skips without a CUDA device).

Providers, on the same inputs:
  triton  slimkern.ops.block_conv2d(backend="triton")  (the default on CUDA tensors)
  cuda    slimkern.ops.block_conv2d(backend="cpp")     (the C++ CUDA kernels)
  naive   slice, .contiguous(), F.conv2d per block (cuDNN), torch.cat
  dense   F.conv2d per block on operands copied contiguous beforehand: the cuDNN limit

Shapes: MobileNet-v1 / ResNet CIFAR layers, batch 64; block tables: ParaDiS [0.5, 0.5] and
sandwich [1.0], [0.5], [0.25] packed. Modes: forward, forward+backward. fp16 and fp32.

    python -m pytest benchmarks/bench_block_ops_gpu.py -m gpu --benchmark-json=benchmarks/results/gpu.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device", allow_module_level=True)

SHAPES = {  # name: (kind, channels, map size)
    "pw256@16": ("1x1", 256, 16),
    "dw256@16": ("dw3x3", 256, 16),
    "dw64@32": ("dw3x3", 64, 32),
    "conv128@16": ("3x3", 128, 16),
}
TABLES = {
    "paradis[.5,.5]": [(0, 0.5, 0, 0.5), (0.5, 1.0, 0.5, 1.0)],
    "sandwich[1,.5,.25]": [(0, 1.0, 0, 1.0), (0, 0.5, 0, 0.5), (0, 0.25, 0, 0.25)],
}
BATCH = 64


def _case(shape, table, dtype):
    kind, C, S = SHAPES[shape]
    dw, k = kind == "dw3x3", 1 if kind == "1x1" else 3
    blocks = [tuple(round(f * C) for f in row) for row in TABLES[table]]
    offs, acc = [], 0
    for i0, i1, _, _ in blocks:
        offs.append(acc)
        acc += i1 - i0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, acc, S, S, generator=g).to("cuda", dtype)
    w = (torch.randn(C, 1 if dw else C, k, k, generator=g) * 0.1).to("cuda", dtype)
    b = torch.randn(C, generator=g).to("cuda", dtype)
    return x, w, b, blocks, offs, k // 2, dw


def _runner(provider, case, backward):
    x, w, b, blocks, offs, pad, dw = case
    x, w, b = (t.detach().requires_grad_(backward) for t in (x, w, b))
    if provider in ("triton", "cuda"):
        backend = "triton" if provider == "triton" else "cpp"
        fwd = lambda: sk.ops.block_conv2d(x, w, b, blocks, offs, 1, pad, 1, dw, backend=backend)  # noqa: E731
    else:
        parts = []
        for (i0, i1, o0, o1), off in zip(blocks, offs):
            xs, ws, bs = x[:, off:off + i1 - i0], (w[o0:o1] if dw else w[o0:o1, i0:i1]), b[o0:o1]
            if provider == "dense":  # copied once, outside the timed region
                xs, ws, bs = (t.detach().contiguous().requires_grad_(backward) for t in (xs, ws, bs))
            parts.append((xs, ws, bs, (i1 - i0) if dw else 1))

        def fwd():
            outs = [F.conv2d(xs.contiguous(), ws.contiguous(), bs, 1, pad, 1, groups) for xs, ws, bs, groups in parts]
            return outs if provider == "dense" else torch.cat(outs, 1)

    def step():
        y = fwd()
        if backward:
            ys = y if isinstance(y, list) else [y]
            torch.autograd.backward(ys, [torch.ones_like(t) for t in ys])
        torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["triton", "cuda", "naive", "dense"])
def test_block_conv2d_gpu(benchmark, provider, shape, table, mode, dtype):
    if provider == "cuda" and not (sk._library.has_op("block_conv2d") and
                                   torch._C._dispatch_has_kernel_for_dispatch_key("slimkern::block_conv2d", "CUDA")):
        pytest.skip("slimkern._C was built without the CUDA kernels")
    benchmark.group = f"{shape} {table} {mode} {str(dtype)[6:]}"
    step = _runner(provider, _case(shape, table, dtype), mode == "fwd+bwd")
    step()  # compile / warm up outside the timing
    benchmark(step)
