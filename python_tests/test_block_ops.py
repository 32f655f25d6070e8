"""block_conv2d / block_linear against the pure-torch references in reference.py."""
from __future__ import annotations

import random

import pytest
import torch

import slimkern as sk
from slimkern import _library
from python_tests.reference import ref_block_conv2d, ref_block_linear


def _cpu_kernel(op):
    return _library.has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"slimkern::{op}", "CPU")


BACKENDS = ["torch"] + (["cpp"] if _cpu_kernel("block_conv2d") else [])
LIN_BACKENDS = ["torch"] + (["cpp"] if _cpu_kernel("block_linear") else [])
needs_cpp = pytest.mark.skipif(not _cpu_kernel("block_conv2d"), reason="C++ CPU kernels not built")


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def random_table(rng, c_in, c_out, G, *, depthwise=False, shared_input=False):
    """G random (possibly overlapping) blocks and their x offsets."""
    rows = []
    for _ in range(G):
        i0 = rng.randrange(0, c_in)
        i1 = rng.randrange(i0 + 1, c_in + 1)
        if depthwise:
            o0, o1 = i0, i1
        else:
            o0 = rng.randrange(0, c_out)
            o1 = rng.randrange(o0 + 1, c_out + 1)
        rows.append((i0, i1, o0, o1))
    if shared_input:
        width = max(r[1] - r[0] for r in rows)
        return rows, [0] * G, width
    offs, acc = [], 0
    for r in rows:
        offs.append(acc)
        acc += r[1] - r[0]
    return rows, offs, acc


CONV_CASES = [
    # (kernel, stride, padding, dilation, depthwise)
    (1, 1, 0, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 1, False),
    (1, 2, 0, 1, False),
    (3, 1, 2, 2, False),
    (3, 1, 1, 1, True),
    (3, 2, 1, 1, True),
    (5, 1, 2, 1, True),
    (3, 1, 2, 2, True),
    (3, 2, 0, 1, True),
]


# The C++ kernels get every case in both dtypes; the pure-torch path (slicing + F.conv2d, close
# to the reference itself) a representative subset, to keep the file fast.
_TORCH_CASES = {0, 2, 5, 8}
SWEEP = [(b, dt, c) for b in BACKENDS for dt in (torch.float32, torch.float64) for i, c in enumerate(CONV_CASES)
         if b == "cpp" or (i in _TORCH_CASES and dt == torch.float32)]


@pytest.mark.parametrize("backend,dtype,case", SWEEP)
def test_conv_sweep(backend, dtype, case):
    k, s, p, d, dw = case
    rng = random.Random(hash((k, s, p, d, dw)) & 0xFFFF)
    torch.manual_seed(rng.randrange(1 << 30))
    for trial in range(4):
        G = rng.randint(1, 8)
        c_in = rng.randint(1, 12)
        c_out = c_in if dw else rng.randint(1, 12)
        shared = trial % 3 == 2
        rows, offs, c_x = random_table(rng, c_in, c_out, G, depthwise=dw, shared_input=shared)
        N, H, W = rng.randint(1, 3), rng.randint(5, 9), rng.randint(5, 9)
        x = torch.randn(N, c_x, H, W, dtype=dtype)
        if trial % 2 == 1:  # non-contiguous x: a channel window of a wider tensor, or transposed H/W
            x = torch.randn(N, c_x + 3, H, W, dtype=dtype)[:, 2:2 + c_x] if trial % 4 == 1 else \
                torch.randn(N, c_x, W, H, dtype=dtype).transpose(2, 3)
        w = torch.randn(c_out, 1 if dw else c_in, k, k, dtype=dtype)
        b = torch.randn(c_out, dtype=dtype) if trial % 3 != 1 else None
        table = torch.tensor(rows) if trial % 2 == 0 else rows
        got = sk.ops.block_conv2d(x, w, b, table, offs, stride=s, padding=p, dilation=d, depthwise=dw,
                                  backend=backend)
        want = ref_block_conv2d(x, w, b, rows, offs, s, p, d, dw)
        torch.testing.assert_close(got, want, **_tol(dtype))

        # gradients against autograd through the reference
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        bs = b.detach().requires_grad_() if b is not None else None
        g = torch.randn_like(want)
        out = sk.ops.block_conv2d(xs, ws, bs, rows, offs, stride=s, padding=p, dilation=d, depthwise=dw,
                                  backend=backend)
        grads = torch.autograd.grad(out, [t for t in (xs, ws, bs) if t is not None], g)
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        br = b.detach().requires_grad_() if b is not None else None
        ref = ref_block_conv2d(xr, wr, br, rows, offs, s, p, d, dw)
        want_grads = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], g)
        for a, e in zip(grads, want_grads):
            torch.testing.assert_close(a, e, **_tol(dtype))


@pytest.mark.parametrize("backend", LIN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_sweep(backend, dtype):
    rng = random.Random(7)
    torch.manual_seed(7)
    for trial in range(12):
        G = rng.randint(1, 8)
        c_in, c_out = rng.randint(1, 20), rng.randint(1, 20)
        rows, offs, c_x = random_table(rng, c_in, c_out, G, shared_input=trial % 3 == 2)
        N = rng.randint(1, 6)
        x = torch.randn(N, c_x, dtype=dtype)
        if trial % 2:
            x = torch.randn(c_x, N, dtype=dtype).t()
        w = torch.randn(c_out, c_in, dtype=dtype)
        b = torch.randn(c_out, dtype=dtype) if trial % 3 != 1 else None
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if b is not None else None
        out = sk.ops.block_linear(xs, ws, bs, rows, offs, backend=backend)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        br = b.clone().requires_grad_() if b is not None else None
        ref = ref_block_linear(xr, wr, br, rows, offs)
        torch.testing.assert_close(out, ref, **_tol(dtype))
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, [t for t in (xs, ws, bs) if t is not None], g)
        want = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **_tol(dtype))


def test_default_offsets_and_overlap_weight_grad_sums():
    # 1.0x and 0.5x in one pass (sandwich rule): the 0.5x block reuses W[:2, :2].
    torch.manual_seed(0)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 6, 2, 2, dtype=torch.float64)
    y = sk.ops.block_conv2d(x, w, None, [(0, 4, 0, 4), (0, 2, 0, 2)])
    assert y.shape == (1, 6, 2, 2)
    y.sum().backward()
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected += x[:, :4].sum((0, 2, 3))[None, :].expand(4, 4)
    expected[:2, :2] += x[:, 4:6].sum((0, 2, 3))[None, :].expand(2, 2)
    torch.testing.assert_close(w.grad[:, :, 0, 0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_conv(backend):
    torch.manual_seed(1)
    dt = torch.float64
    for dw, k, s, p, d in [(False, 3, 2, 1, 1), (False, 1, 1, 0, 1), (True, 3, 1, 1, 2), (True, 3, 2, 1, 1)]:
        c = 4
        rows = [(0, 4, 0, 4), (0, 2, 0, 2), (1, 3, 1, 3)] if dw else [(0, 4, 0, 3), (1, 3, 2, 4)]
        c_x = sum(r[1] - r[0] for r in rows)
        x = torch.randn(1, c_x, 5, 5, dtype=dt, requires_grad=True)
        w = torch.randn(c, 1 if dw else c, k, k, dtype=dt, requires_grad=True)
        b = torch.randn(c, dtype=dt, requires_grad=True)
        fn = lambda x, w, b: sk.ops.block_conv2d(x, w, b, rows, None, s, p, d, dw, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@needs_cpp
@pytest.mark.parametrize("table,offs", [
    ([(0, 64, 0, 96), (64, 128, 96, 160)], None),           # ParaDiS blocks of equal shape: one grouped conv
    ([(0, 128, 0, 128), (0, 64, 0, 64), (0, 32, 0, 32)], [0, 0, 0]),  # sandwich on one shared input
    ([(0, 96, 0, 80)], [16]),                                # G = 1 on a window of a wider x
    ([(8, 40, 0, 24), (0, 16, 8, 40)], None),                # small blocks of different shapes
    ([(0, 64, 0, 64), (64, 96, 64, 96), (96, 128, 96, 128), (32, 64, 32, 64)], None),  # [0.5, 0.25, 0.25] + 1
    ([(0, 32, 0, 40), (0, 32, 40, 80)], None),               # one grouped conv on a weight view
])
@pytest.mark.parametrize("hw", [1, 2, 3, 4, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_engines(table, offs, hw, dtype):
    # 1x1 blocks take per-image GEMMs (our kernel or BLAS), gathered GEMMs over the batch's
    # pixels (float32 maps of at most 16 pixels: 1x1 to 4x4) or oneDNN by runs (BLAS on small
    # maps); both dtypes, since float64 and float32 may take different engines.
    torch.manual_seed(5)
    width = max(r[1] - r[0] for r in table)
    c_x = max((o or 0) for o in offs) + width if offs else sum(r[1] - r[0] for r in table)
    x = torch.randn(3, c_x, hw, hw, dtype=dtype, requires_grad=True)
    w = torch.randn(160, 128, 1, 1, dtype=dtype, requires_grad=True)
    b = torch.randn(160, dtype=dtype, requires_grad=True)
    out = sk.ops.block_conv2d(x, w, b, table, offs, backend="cpp")
    ref = ref_block_conv2d(x, w, b, table, offs, 1, 0, 1, False)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, **_tol(dtype))


@needs_cpp
@pytest.mark.parametrize("table,offs,stride", [
    ([(0, 64, 0, 64), (64, 72, 64, 72)], None, 1),   # consecutive weight rows: one call on a weight view
    ([(0, 80, 0, 80)], [4], 2),                       # G = 1 on a window of a wider x, strided
    ([(0, 80, 0, 80), (8, 72, 8, 72)], [0, 8], 1),    # overlapping x windows: two runs, grads added
    ([(0, 80, 0, 80), (0, 40, 0, 40), (0, 20, 0, 20)], None, 2),  # sandwich packed: stacked weight copy
    ([(40, 60, 40, 60), (0, 40, 0, 40)], [40, 0], 1),  # blocks out of order over a permuted x
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_depthwise_engines(table, offs, stride, dtype):
    # float32 runs one oneDNN call per run of packed blocks, float64 the plane loops.
    torch.manual_seed(7)
    c_x = max(o + r[1] - r[0] for o, r in zip(offs, table)) if offs else sum(r[1] - r[0] for r in table)
    x = torch.randn(2, c_x, 6, 7, dtype=dtype, requires_grad=True)
    w = torch.randn(80, 1, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(80, dtype=dtype, requires_grad=True)
    out = sk.ops.block_conv2d(x, w, b, table, offs, stride=stride, padding=1, depthwise=True, backend="cpp")
    ref = ref_block_conv2d(x, w, b, table, offs, stride, 1, 1, True)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, **_tol(dtype))


def _depthwise_vs_float64(x, w, b, table, offs, stride, padding, dilation, threads, tol, grad_atol):
    """float32 depthwise block_conv2d (C++) on `threads` threads against per-block F.conv2d in
    float64: output to rtol = atol = tol, the x / w / b gradients to rtol = tol, atol = grad_atol."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = sk.ops.block_conv2d(x, w, b, table, offs, stride, padding, dilation, True, backend="cpp")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), g)
    finally:
        torch.set_num_threads(prev)
    ref = ref_block_conv2d(x.double(), w.double(), b.double(), table, offs, stride, padding, dilation, True)
    torch.testing.assert_close(out, ref.float(), rtol=tol, atol=tol)
    for got, want in zip(grads, torch.autograd.grad(ref, (x, w, b), g.double())):
        torch.testing.assert_close(got, want.float(), rtol=tol, atol=grad_atol)


@needs_cpp
@pytest.mark.parametrize("k,padding,dilation,hw", [
    ((3, 3), 1, 1, (33, 37)),   # rows of 37: two full vectors and a 5-lane tail
    ((3, 5), (0, 2), 2, (9, 20)),  # unequal taps, dilated, padding only along the width
    ((1, 1), 0, 1, (4, 16)),    # one tap, one exact vector
    ((5, 3), 2, (1, 3), (7, 5)),  # taps reaching past both borders of a 5-wide row
])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("stride", [1, 2, (1, 2)])
def test_depthwise_float32_planes(k, padding, dilation, hw, threads, stride):
    # float32 stride-1 depthwise takes the AVX-512 planes where the processor has them: masked
    # loads past both borders, vector and row-block tails, unequal and dilated taps, overlapping
    # blocks summing into shared weights and inputs from per-thread partial sums; against
    # per-block F.conv2d in float64. Strided: the stride-1 planes subsampled forward and fed a
    # zero-stuffed grad_out backward (rows of >= 16 stride-1 outputs; maps of at most 64 pixels
    # that the planes do not take run channels last, the rest oneDNN).
    torch.manual_seed(10)
    table, offs = [(0, 12, 0, 12), (4, 10, 4, 10), (12, 20, 12, 20)], [0, 4, 12]
    x = torch.randn(3, 20, *hw, requires_grad=True)
    _depthwise_vs_float64(x, torch.randn(20, 1, *k, requires_grad=True), torch.randn(20, requires_grad=True), table,
                          offs, stride, padding, dilation, threads, tol=1e-4, grad_atol=1e-3)


@needs_cpp
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_depthwise_float32_tiny_maps(hw, threads):
    # float32 stride-1 depthwise on maps of at most 2x2 (channels last: most taps fall off the
    # map); overlapping blocks, per-block F.conv2d in float64 as the reference.
    torch.manual_seed(11)
    table, offs = [(0, 12, 0, 12), (4, 10, 4, 10), (12, 20, 12, 20)], [0, 4, 12]
    x = torch.randn(5, 20, *hw, requires_grad=True)
    _depthwise_vs_float64(x, torch.randn(20, 1, 3, 3, requires_grad=True), torch.randn(20, requires_grad=True), table,
                          offs, 1, 1, 1, threads, tol=1e-5, grad_atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("hw", [(4, 4), (8, 8), (3, 5)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k,padding,dilation", [((3, 3), 1, 1), ((5, 3), (2, 1), (1, 2))])
@pytest.mark.parametrize("threads", [1, 3])
def test_depthwise_float32_channels_last(hw, stride, k, padding, dilation, threads):
    # float32 depthwise on maps of at most 64 pixels: channels last, one multiply-add over the
    # packed channels per (output pixel, input pixel, tap) term. Overlapping x windows (grad
    # input summed per x channel), blocks sharing weight channels (per-thread partial weight
    # gradients), 37 channels (vector tails), 5 images over 1-3 threads; per-block F.conv2d in
    # float64 as the reference.
    torch.manual_seed(12)
    table, offs = [(0, 20, 0, 20), (4, 14, 4, 14), (20, 27, 20, 27)], [0, 6, 20]
    x = torch.randn(5, 27, *hw, requires_grad=True)
    _depthwise_vs_float64(x, torch.randn(27, 1, *k, requires_grad=True), torch.randn(27, requires_grad=True), table,
                          offs, stride, padding, dilation, threads, tol=1e-5, grad_atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("groups_of", [2, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_equal_blocks_grouped(groups_of, k):
    # ParaDiS [1/g]*g on a kxk conv: one grouped oneDNN call over the diagonal weight blocks,
    # then [1.0] and the branches together (three runs) — against per-block F.conv2d.
    torch.manual_seed(8)
    c = 48
    step = c // groups_of
    branches = [(i * step, (i + 1) * step, i * step, (i + 1) * step) for i in range(groups_of)]
    for table in (branches, [(0, c, 0, c)] + branches + [(0, step, 0, step)]):
        c_x = sum(r[1] - r[0] for r in table)
        x = torch.randn(4, c_x, 8, 8, requires_grad=True)
        w = torch.randn(c, c, k, k, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        out = sk.ops.block_conv2d(x, w, b, table, None, 1, k // 2, backend="cpp")
        ref = ref_block_conv2d(x, w, b, table, None, 1, k // 2, 1, False)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _convolution_calls(fn) -> int:
    """How many aten::convolution calls `fn()` makes (C++ callers included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def _channels_last_copies(fn) -> int:
    """How many `contiguous` copies slimkern's block_conv2d makes itself during `fn()` (not
    those inside ATen's convolution): the channels-last route's copy of each run's input, and of
    the output back to NCHW when one run makes all of it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::contiguous" and e.cpu_parent is not None
               and e.cpu_parent.name.startswith("slimkern::block_conv2d"))


@needs_cpp
@pytest.mark.parametrize("hw,width", [(32, 4), (32, 8), (32, 16), (16, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_groups_on_large_maps(hw, width, dtype):
    # ParaDiS branches of `width` channels on a 3x3 conv, as ResNet-20's first stage packs them
    # (with a block of 32: oneDNN by runs, not the unfolded GEMMs). Below AVX-512, oneDNN's
    # grouped convolution of groups under 16 channels on maps of 1024 pixels or more is 1.7-3x
    # slower than a call a group, so those are split; AVX-512 and every other shape keep one
    # grouped call. Same values either way.
    torch.manual_seed(13)
    c = 32
    table = [(0, c, 0, c)] + [(i, i + width, i, i + width) for i in range(0, c, width)]
    x = torch.randn(3, 2 * c, hw, hw, dtype=dtype, requires_grad=True)
    w = torch.randn(c, c, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    out = sk.ops.block_conv2d(x, w, b, table, None, 1, 1, backend="cpp")
    ref = ref_block_conv2d(x.double(), w.double(), b.double(), table, None, 1, 1, 1, False)
    torch.testing.assert_close(out, ref.to(dtype), rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    # the weight gradient sums 3 * hw * hw products: float32 ends ~1e-4 from float64
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g.double())):
        torch.testing.assert_close(got, want.to(dtype), rtol=1e-4, atol=5e-4)
    split = _library.cpu_capability()["in_use"] != "avx512" and hw * hw >= 1024 and width < 16
    calls = _convolution_calls(lambda: sk.ops.block_conv2d(x.detach(), w.detach(), b.detach(), table, None, 1, 1,
                                                           backend="cpp"))
    assert calls == 1 + (c // width if split else 1)


@needs_cpp
@pytest.mark.parametrize("table,offs,stride,dtype,copies", [
    # ResNet-20 at width 1.2: 19 channels, read from a window of a wider x
    ([(0, 19, 0, 19)], [3], 1, torch.float32, 2),
    # sandwich widths 19 / 12 / 8 on one shared input: three runs, input gradients summed
    ([(0, 19, 0, 19), (0, 12, 19, 31), (0, 8, 31, 39)], [0, 0, 0], 1, torch.float32, 3),
    # 16 in, 20 out: the output count alone is off the block of 16
    ([(0, 16, 0, 20)], None, 1, torch.float32, 2),
    # multiples of 16, strided, float64, and a grouped run (ParaDiS [0.5, 0.5] of 38) stay NCHW
    ([(0, 16, 0, 16), (0, 32, 16, 48)], [0, 0], 1, torch.float32, 0),
    ([(0, 19, 0, 19)], None, 2, torch.float32, 0),
    ([(0, 19, 0, 19)], None, 1, torch.float64, 0),
    ([(0, 19, 0, 19), (19, 38, 19, 38)], None, 1, torch.float32, 0),
])
def test_channels_last_route(table, offs, stride, dtype, copies):
    # On AVX-512, dense stride-1 float32 runs whose channel counts are off oneDNN's block of 16
    # convolve channels last (copies in, NCHW out); everywhere else they stay NCHW. The values,
    # and the NCHW layout of the output and of every gradient, are the same either way.
    torch.manual_seed(15)
    c_x = max(o + r[1] - r[0] for o, r in zip(offs, table)) if offs else sum(r[1] - r[0] for r in table)
    x = torch.randn(3, c_x + 2, 16, 16, dtype=dtype)[:, 1:c_x + 1].requires_grad_()
    w = torch.randn(max(r[3] for r in table), max(r[1] for r in table), 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=dtype, requires_grad=True)
    out = sk.ops.block_conv2d(x, w, b, table, offs, stride, 1, backend="cpp")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), g)
    ref = ref_block_conv2d(x.double(), w.double(), b.double(), table, offs, stride, 1, 1, False)
    torch.testing.assert_close(out, ref.to(dtype), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, torch.autograd.grad(ref, (x, w, b), g.double())):
        torch.testing.assert_close(got, want.to(dtype), rtol=1e-4, atol=1e-3)
    assert out.is_contiguous() and all(t.is_contiguous() for t in grads)
    on = _library.cpu_capability()["in_use"] == "avx512"
    made = _channels_last_copies(lambda: sk.ops.block_conv2d(x.detach(), w.detach(), b.detach(), table, offs,
                                                             stride, 1, backend="cpp"))
    assert made == (copies if on else 0)


@needs_cpp
@pytest.mark.parametrize("table,offs,k,stride,padding,dilation,hw", [
    # branches of 4 and 6 input channels packed one after another
    ([(i, i + 4, i, i + 4) for i in range(0, 16, 4)] + [(0, 6, 16, 22)], None, 3, 1, 1, 1, (32, 32)),
    # sandwich widths on one shared input, stride 2, odd map (row tails, bottom/right padding)
    ([(0, 7, 0, 12), (0, 4, 0, 8), (0, 5, 0, 10)], [0, 0, 0], 3, 2, 1, 1, (33, 35)),
    # the stem: 3 input channels read by every block, stride 2 (strided unfold)
    ([(0, 3, 0, 38), (0, 3, 0, 16), (0, 3, 16, 32)], [0, 0, 0], 3, 2, 1, 1, (32, 32)),
    # rectangular kernel, dilation, padding 2, overlapping windows of a permuted x
    ([(0, 6, 0, 5), (2, 9, 5, 12)], [3, 0], (5, 3), 1, 2, 2, (34, 31)),
    # no padding, 2x2 taps, stride (2, 1)
    ([(0, 7, 0, 9)], [1], (2, 2), (2, 1), 0, 1, (40, 26)),
])
@pytest.mark.parametrize("threads", [1, 3])
def test_unfold_engine(table, offs, k, stride, padding, dilation, hw, threads):
    # Dense float32 layers of blocks under 8 input channels on maps of >= 1024 pixels run as
    # GEMMs on unfolded columns (AVX2 / AVX-512; the baseline capability takes oneDNN). Against
    # float64 per-block F.conv2d, on a window of a wider x (batch and channel strides of another
    # shape), with bias.
    torch.manual_seed(14)
    width = max(r[1] - r[0] for r in table)
    c_x = max(o + r[1] - r[0] for o, r in zip(offs, table)) if offs else sum(r[1] - r[0] for r in table)
    x = torch.randn(3, c_x + 3, *hw)[:, 2:c_x + 2].requires_grad_()
    kk = (k, k) if isinstance(k, int) else k
    w = torch.randn(max(r[3] for r in table), max(r[1] for r in table), *kk, requires_grad=True)
    b = torch.randn(w.shape[0], requires_grad=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = sk.ops.block_conv2d(x, w, b, table, offs, stride, padding, dilation, backend="cpp")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), g)
        calls = _convolution_calls(lambda: sk.ops.block_conv2d(x.detach(), w, b, table, offs, stride, padding,
                                                               dilation, backend="cpp"))
    finally:
        torch.set_num_threads(prev)
    ref = ref_block_conv2d(x.double(), w.double(), b.double(), table, offs, stride, padding, dilation, False)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    # the weight gradient sums 3 images' worth of products per entry
    for got, want in zip(grads, torch.autograd.grad(ref, (x, w, b), g.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-3)
    unfolded = _library.cpu_capability()["in_use"] != "default"
    assert (calls == 0) == unfolded, width


@needs_cpp
@pytest.mark.parametrize("n,hw,bias", [(1, 23, True), (2, 9, False), (5, 16, False), (7, 3, True), (4, 1, False),
                                        (3, 4, True), (40, 4, False)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pointwise_gemm_tiles(n, hw, bias, threads):
    # The AVX-512 GEMM's edges: depth beyond one 128-deep pass (200 input channels forward,
    # 140 output channels backward), row tiles of 6 with remainders (140, 13 output channels),
    # column tails (529, 81 pixels), transposes with partial 16x16 tiles, and batches smaller
    # than the thread count (pixels split); 4x4, 3x3 and 1x1 maps gather the batch's pixels,
    # split by images over the threads; the forward takes a task's images 16 at a time (40 images
    # on one or two threads: chunks of 16, 16, 8 or 16, 4). Products of 512 columns or more (529
    # pixels; the backward's 40 images of 4x4 on one thread) pack A into row tiles, the last one
    # zero-padded.
    torch.manual_seed(9)
    table = [(0, 200, 0, 140), (0, 13, 140, 153), (200, 203, 153, 166)]
    x = torch.randn(n, 216, hw, hw, dtype=torch.float32, requires_grad=True)
    w = torch.randn(166, 203, 1, 1, requires_grad=True)
    b = torch.randn(166, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = sk.ops.block_conv2d(x, w, b, table, backend="cpp")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, g)
    finally:
        torch.set_num_threads(prev)
    ref = ref_block_conv2d(x.double(), w.double(), b.double() if bias else None, table, None, 1, 0, 1, False)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=2e-3)
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, g.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=5e-3)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pointwise_grad_weight_thread_partials(threads):
    # The GEMM engine sums per-thread partial weight gradients; overlapping blocks (sandwich
    # on one shared input) add into the same weight entries from every thread. An odd batch
    # split over 1-3 threads must give the same sums.
    torch.manual_seed(6)
    table, offs = [(0, 48, 0, 40), (0, 24, 0, 20), (8, 32, 4, 28)], [0, 0, 8]
    x = torch.randn(7, 48, 11, 11)
    w = torch.randn(40, 48, 1, 1, requires_grad=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sk.ops.block_conv2d(x, w, None, table, offs, backend="cpp").square().sum().backward()
    finally:
        torch.set_num_threads(prev)
    wr = w.detach().requires_grad_()
    ref_block_conv2d(x, wr, None, table, offs, 1, 0, 1, False).square().sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_gradcheck_linear(backend):
    torch.manual_seed(2)
    dt = torch.float64
    rows = [(0, 5, 0, 3), (2, 4, 1, 6), (0, 5, 0, 6)]
    x = torch.randn(3, 5, dtype=dt, requires_grad=True)
    w = torch.randn(6, 5, dtype=dt, requires_grad=True)
    b = torch.randn(6, dtype=dt, requires_grad=True)
    fn = lambda x, w, b: sk.ops.block_linear(x, w, b, rows, [0, 0, 0], backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@needs_cpp
@pytest.mark.parametrize("dw,hw", [(False, 6), (True, 6), (False, 32)])  # 32x32 dense: unfolded GEMMs
def test_opcheck_conv(dw, hw):
    torch.manual_seed(3)
    rows = [0, 4, 0, 4, 0, 2, 0, 2]
    x = torch.randn(2, 6, hw, hw, requires_grad=True)
    w = torch.randn(4, 1 if dw else 4, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    args = (x, w, b, rows, [0, 4], [1, 1], [1, 1], [1, 1], dw)
    torch.library.opcheck(torch.ops.slimkern.block_conv2d.default, args)
    g = torch.randn(2, 6, hw, hw)
    torch.library.opcheck(torch.ops.slimkern.block_conv2d_backward.default,
                          (g, x.detach(), w.detach(), rows, [0, 4], [1, 1], [1, 1], [1, 1], dw, [True, True, True]))
    torch.library.opcheck(torch.ops.slimkern.block_conv2d_backward.default,
                          (g, x.detach(), w.detach(), rows, [0, 4], [1, 1], [1, 1], [1, 1], dw, [False, True, False]))


@pytest.mark.skipif(not _cpu_kernel("block_linear"), reason="C++ CPU kernels not built")
def test_opcheck_linear():
    torch.manual_seed(4)
    rows = [0, 5, 0, 3, 1, 4, 2, 6]
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.slimkern.block_linear.default, (x, w, b, rows, [0, 5]))
    torch.library.opcheck(torch.ops.slimkern.block_linear_backward.default,
                          (torch.randn(3, 7), x.detach(), w.detach(), rows, [0, 5], [True, False, True]))


# --- bad input -------------------------------------------------------------------------------

def _conv_inputs():
    return torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), torch.randn(4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(blocks=[(0, 5, 0, 4)]), ValueError, "not inside the weight's 4 input channels"),
    (dict(blocks=[(0, 4, 0, 9)]), ValueError, "not inside the weight's 4 output channels"),
    (dict(blocks=[(3, 1, 0, 4)]), ValueError, "stop < start"),
    (dict(blocks=[]), ValueError, "G >= 1"),
    (dict(blocks=torch.zeros(0, 4, dtype=torch.int64)), ValueError, "G >= 1"),
    (dict(blocks=[(0, 4, 0, 4), (0, 2, 0, 2)]), ValueError, "x's channel count does not match"),
    (dict(blocks=[(0, 4, 0, 4)], x_offsets=[0, 0]), ValueError, "x_offsets has 2 entries"),
    (dict(blocks=[(0, 4, 0, 4)], x_offsets=[1]), ValueError, "x's channel count does not match"),
    (dict(blocks=[(0, 2, 0, 2)], depthwise=True), ValueError, r"depthwise weight must have shape \[C, 1"),
    (dict(blocks=torch.zeros(1, 3, dtype=torch.int64)), ValueError, r"shape \[G, 4\]"),
    (dict(blocks=[(0, 4, 0, 4)], stride=0), ValueError, "stride must be >= 1"),
    (dict(blocks=[(0, 4, 0, 4)], backend="cuda"), ValueError, "backend must be one of"),
])
def test_conv_bad_input(backend, kwargs, exc, match):
    x, w, b = _conv_inputs()
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=match):
        sk.ops.block_conv2d(x, w, b, **kwargs)


def test_conv_bad_tensors():
    x, w, b = _conv_inputs()
    with pytest.raises(ValueError, match="x has the wrong rank"):
        sk.ops.block_conv2d(x[0], w, b, [(0, 4, 0, 4)])
    with pytest.raises(ValueError, match="weight has the wrong rank"):
        sk.ops.block_conv2d(x, w[:, :, 0], b, [(0, 4, 0, 4)])
    with pytest.raises(TypeError, match="same dtype"):
        sk.ops.block_conv2d(x, w.double(), b, [(0, 4, 0, 4)])
    with pytest.raises(TypeError, match="same dtype"):
        sk.ops.block_conv2d(x, w, b.double(), [(0, 4, 0, 4)])
    with pytest.raises(ValueError, match="same device"):
        sk.ops.block_conv2d(x, w.to("meta"), b, [(0, 4, 0, 4)])
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        sk.ops.block_conv2d(x, w, b[:3], [(0, 4, 0, 4)])
    with pytest.raises(ValueError, match="equal input and output ranges"):
        sk.ops.block_conv2d(x, w[:, :1], b, [(0, 2, 1, 3)], depthwise=True)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sk.ops.block_conv2d(x[:, :, :2, :2], w, b, [(0, 4, 0, 4)])


@needs_cpp
@pytest.mark.parametrize("args,match", [
    (dict(blocks=[0, 5, 0, 4]), "not inside the weight's 4 input channels"),
    (dict(blocks=[2, 1, 0, 4]), "stop < start"),
    (dict(blocks=[]), "G >= 1"),
    (dict(blocks=[0, 4, 0, 4, 0, 2]), "4 entries per block"),
    (dict(x_offsets=[2]), "x's channel count does not match"),
    (dict(x_offsets=[0, 0]), "x_offsets has 2 entries"),
    (dict(x=torch.randn(4, 5, 5)), "x has the wrong rank"),
    (dict(w=torch.randn(4, 4, 3, 3, dtype=torch.float64)), "same dtype"),
    (dict(b=torch.randn(3)), "bias"),
    (dict(stride=[0, 1]), "stride"),
])
def test_conv_bad_input_cpp_op(args, match):
    # The C++ op checks again: callers of torch.ops.slimkern get the same clear errors.
    x, w, b = _conv_inputs()
    a = dict(x=x, w=w, b=b, blocks=[0, 4, 0, 4], x_offsets=[0], stride=[1, 1])
    a.update(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.slimkern.block_conv2d(a["x"], a["w"], a["b"], a["blocks"], a["x_offsets"], a["stride"], [1, 1],
                                        [1, 1], False)


@needs_cpp
def test_conv_bad_input_cpp_depthwise():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="equal input and output ranges"):
        torch.ops.slimkern.block_conv2d(x, w, None, [0, 2, 1, 3], [0], [1, 1], [1, 1], [1, 1], True)
    with pytest.raises(RuntimeError, match="depthwise"):
        torch.ops.slimkern.block_conv2d(x, torch.randn(4, 2, 3, 3), None, [0, 2, 0, 2], [0], [1, 1], [1, 1],
                                        [1, 1], True)


@pytest.mark.parametrize("backend", LIN_BACKENDS)
def test_linear_bad_input(backend):
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match="not inside the weight's 4 input channels"):
        sk.ops.block_linear(x, w, b, [(0, 6, 0, 5)], backend=backend)
    with pytest.raises(ValueError, match="stop < start"):
        sk.ops.block_linear(x, w, b, [(0, 4, 3, 2)], backend=backend)
    with pytest.raises(ValueError, match="x's channel count does not match"):
        sk.ops.block_linear(x[:, :3], w, b, [(0, 4, 0, 5)], backend=backend)
    with pytest.raises(ValueError, match="G >= 1"):
        sk.ops.block_linear(x, w, b, [], backend=backend)
    with pytest.raises(ValueError, match="x has the wrong rank"):
        sk.ops.block_linear(x[None], w, b, [(0, 4, 0, 5)], backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        sk.ops.block_linear(x, w.double(), b, [(0, 4, 0, 5)], backend=backend)
    with pytest.raises(ValueError, match="same device"):
        sk.ops.block_linear(x, w, b.to("meta"), [(0, 4, 0, 5)], backend=backend)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match="not inside the weight's 4 input channels"):
            torch.ops.slimkern.block_linear(x, w, b, [0, 6, 0, 5], [0])
        with pytest.raises(RuntimeError, match="G >= 1"):
            torch.ops.slimkern.block_linear(x, w, b, [], [])
        with pytest.raises(RuntimeError, match="wrong rank"):
            torch.ops.slimkern.block_linear(x[None], w, b, [0, 4, 0, 5], [0])
