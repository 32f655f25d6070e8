"""block_conv2d / block_linear on a GPU: the C++ CUDA kernels and the Triton kernels against
the pure-torch reference (python_tests/reference.py), in float32/float64/float16/bfloat16,
plus gradcheck in float64 for the C++ CUDA op. Every test needs a CUDA device
(`pytest -m gpu`); without one they skip (conftest.py).
"""
import pytest
import torch

import slimkern as sk
from slimkern import _library

from block_cases import CONV_CASES, LINEAR_CASES, flat, make_conv_inputs
from reference import ref_block_conv2d, ref_block_linear

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]

DEVICE = "cuda"
# Max error allowed relative to the reference's largest magnitude, per dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _has_cuda_kernel(op):
    return _library.has_op(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"slimkern::{op}", "CUDA")


needs_cpp_conv = pytest.mark.skipif(not _has_cuda_kernel("block_conv2d"),
                                    reason="slimkern._C was built without the CUDA kernels (FORCE_CUDA=1)")
needs_cpp_linear = pytest.mark.skipif(not _has_cuda_kernel("block_linear"),
                                      reason="slimkern._C was built without the CUDA kernels (FORCE_CUDA=1)")


def _close(got, ref, dtype, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} x {scale:.3g}"


def _ref_conv(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy):
    """Reference output and gradients, computed in float64 from the same (rounded) inputs."""
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    y = ref_block_conv2d(xr, wr, br, torch.tensor(blocks), offs, stride, padding, dilation, depthwise)
    y.backward(gy.double())
    return y.detach(), xr.grad, wr.grad, None if br is None else br.grad


def _conv_args(case, dtype, noncontig=False, seed=0):
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = make_conv_inputs(
        case, DEVICE, dtype=dtype, noncontig=noncontig, seed=seed)
    st, pd, dl = ([v, v] if isinstance(v, int) else list(v) for v in (stride, padding, dilation))
    return x, w, b, blocks, offs, st, pd, dl, depthwise


def _conv_backends():
    from slimkern.triton import block_conv2d as tconv

    def cpp(x, w, b, fl, offs, st, pd, dl, dw, gy):
        y = torch.ops.slimkern.block_conv2d(x, w, b, fl, offs, st, pd, dl, dw)
        return (y,) + tuple(torch.ops.slimkern.block_conv2d_backward(gy, x, w, fl, offs, st, pd, dl, dw,
                                                                      [True, True, True]))

    def triton(x, w, b, fl, offs, st, pd, dl, dw, gy):
        y = tconv.forward(x, w, b, fl, offs, st, pd, dl, dw)
        return (y,) + tuple(tconv.backward(gy, x, w, fl, offs, st, pd, dl, dw, (True, True, True)))

    return {"cpp": cpp, "triton": triton}


def _check_conv(backend, case, dtype, noncontig=False):
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(case, dtype, noncontig)
    y_ref = ref_block_conv2d(x.double(), w.double(), b.double(), torch.tensor(blocks), offs, st, pd, dl, dw)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y_ref, gx_ref, gw_ref, gb_ref = _ref_conv(x, w, b, blocks, offs, st, pd, dl, dw, gy)
    y, gx, gw, gb = _conv_backends()[backend](x, w, b, flat(blocks), offs, st, pd, dl, dw, gy)
    _close(y, y_ref, dtype, f"{backend} y")
    _close(gx, gx_ref, dtype, f"{backend} grad_x")
    _close(gw, gw_ref, dtype, f"{backend} grad_w")
    _close(gb, gb_ref, dtype, f"{backend} grad_b")


@needs_cpp_conv
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_cpp_conv_matches_reference(case, dtype, noncontig):
    _check_conv("cpp", case, dtype, noncontig)


@needs_cpp_conv
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_cpp_conv_half_precision(case, dtype):
    _check_conv("cpp", case, dtype)


@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_triton_conv_matches_reference(case, dtype, noncontig):
    _check_conv("triton", case, dtype, noncontig)


# Layer shapes of the benchmarks (MobileNet/ResNet CIFAR), batch 8: many tiles, grid-stride
# loops and split-K reductions, which the tiny cases above never reach.
LARGE_CASES = [
    ("sandwich_3x3", 8, 64 + 32 + 16, 16, 16, (64, 64, 3, 3), [(0, 64, 0, 64), (0, 32, 0, 32), (0, 16, 0, 16)],
     [0, 64, 96], 1, 1, 1, False),
    ("paradis_1x1", 8, 128, 16, 16, (128, 128, 1, 1), [(0, 64, 0, 64), (64, 128, 64, 128)], [0, 64], 1, 0, 1,
     False),
    ("dw_s2", 8, 96, 32, 32, (64, 1, 3, 3), [(0, 64, 0, 64), (0, 32, 0, 32)], [0, 64], 2, 1, 1, True),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", LARGE_CASES, ids=[c[0] for c in LARGE_CASES])
def test_layer_shapes_fp32(case, backend):
    if backend == "cpp" and not _has_cuda_kernel("block_conv2d"):
        pytest.skip("slimkern._C was built without the CUDA kernels")
    _check_conv(backend, case, torch.float32)


@needs_cpp_conv
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[5]], ids=["dense", "dilated", "dw"])
def test_cpp_conv_gradcheck_fp64(case):
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(case, torch.float64)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: sk.ops.block_conv2d(x, w, b, blocks, offs, st, pd, dl, dw, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


@needs_cpp_conv
def test_cpp_conv_runs_on_the_current_stream():
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(LARGE_CASES[0], torch.float32)
    expected = torch.ops.slimkern.block_conv2d(x, w, b, flat(blocks), offs, st, pd, dl, dw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.slimkern.block_conv2d(x, w, b, flat(blocks), offs, st, pd, dl, dw)
        got = got * 1.0  # an op queued behind the kernel on the same stream
    stream.synchronize()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_conv_empty_batch(backend):
    if backend == "cpp" and not _has_cuda_kernel("block_conv2d"):
        pytest.skip("slimkern._C was built without the CUDA kernels")
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(CONV_CASES[0], torch.float32)
    x = x[:0]
    gy = torch.empty((0, 12, 6, 5), dtype=torch.float32, device=DEVICE)
    y, gx, gw, gb = _conv_backends()[backend](x, w, b, flat(blocks), offs, st, pd, dl, dw, gy)
    assert y.shape == (0, 12, 6, 5) and gx.shape == x.shape
    assert gw.shape == w.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0


@needs_cpp_conv
def test_cpp_conv_bad_inputs_name_the_problem():
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(CONV_CASES[0], torch.float32)
    op = torch.ops.slimkern.block_conv2d
    with pytest.raises(RuntimeError, match="must be on the same device"):
        op(x, w.cpu(), b, flat(blocks), offs, st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        op(x, w.double(), b, flat(blocks), offs, st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="not inside the weight's 6 input channels"):
        op(x, w, b, [0, 7, 0, 8, 0, 3, 0, 4], offs, st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="x's channel count does not match the blocks"):
        op(x[:, :8], w, b, flat(blocks), offs, st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="at least one block"):
        op(x, w, b, [], [], st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="wrong rank"):
        op(x[0], w, b, flat(blocks), offs, st, pd, dl, dw)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        torch.ops.slimkern.block_conv2d_backward(x, x, w, flat(blocks), offs, st, pd, dl, dw, [True] * 3)


def test_public_conv_on_cuda_defaults_to_a_gpu_backend_with_autograd():
    x, w, b, blocks, offs, st, pd, dl, dw = _conv_args(CONV_CASES[2], torch.float32)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = sk.ops.block_conv2d(x, w, b, blocks, offs, st, pd, dl, dw)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref, gx_ref, gw_ref, gb_ref = _ref_conv(x, w, b, blocks, offs, st, pd, dl, dw, gy)
    for got, ref, what in ((y, y_ref, "y"), (x.grad, gx_ref, "grad_x"), (w.grad, gw_ref, "grad_w"),
                           (b.grad, gb_ref, "grad_b")):
        _close(got.detach(), ref, torch.float32, what)


# ------------------------------------------------------------------------------------ linear
def _linear_args(case, dtype, seed=0):
    _, N, cx, wshape, blocks, offs = case
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x = rand(cx, N).t()  # non-contiguous
    w = rand(wshape[0], wshape[1] + 4)[:, 4:]  # a strided slice of a larger weight
    return x, w, rand(wshape[0]), blocks, offs


def _linear_backends():
    from slimkern.triton import block_linear as tlin

    def cpp(x, w, b, fl, offs, gy):
        y = torch.ops.slimkern.block_linear(x, w, b, fl, offs)
        return (y,) + tuple(torch.ops.slimkern.block_linear_backward(gy, x, w, fl, offs, [True, True, True]))

    def triton(x, w, b, fl, offs, gy):
        return (tlin.forward(x, w, b, fl, offs),) + tuple(tlin.backward(gy, x, w, fl, offs, (True, True, True)))

    return {"cpp": cpp, "triton": triton}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_matches_reference(case, backend, dtype):
    if backend == "cpp" and not _has_cuda_kernel("block_linear"):
        pytest.skip("slimkern._C was built without the CUDA kernels")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16/bfloat16/float32 (float64 runs on the C++ kernel)")
    x, w, b, blocks, offs = _linear_args(case, dtype)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = ref_block_linear(xr, wr, br, torch.tensor(blocks), offs)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    y_ref.backward(gy.double())
    y, gx, gw, gb = _linear_backends()[backend](x, w, b, flat(blocks), offs, gy)
    _close(y, y_ref.detach(), dtype, "y")
    _close(gx, xr.grad, dtype, "grad_x")
    _close(gw, wr.grad, dtype, "grad_w")
    _close(gb, br.grad, dtype, "grad_b")


@needs_cpp_linear
def test_cpp_linear_gradcheck_fp64():
    x, w, b, blocks, offs = _linear_args(LINEAR_CASES[2], torch.float64)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: sk.ops.block_linear(x, w, b, blocks, offs, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


@needs_cpp_linear
def test_cpp_linear_bad_inputs_name_the_problem():
    x, w, b, blocks, offs = _linear_args(LINEAR_CASES[0], torch.float32)
    op = torch.ops.slimkern.block_linear
    with pytest.raises(RuntimeError, match="must be on the same device"):
        op(x, w, b.cpu(), flat(blocks), offs)
    with pytest.raises(RuntimeError, match="not inside the weight's 24 output channels"):
        op(x, w, b, [0, 20, 0, 25, 0, 10, 0, 12], offs)
    with pytest.raises(RuntimeError, match="x_offsets has 1 entries but there are 2 blocks"):
        op(x, w, b, flat(blocks), [0])
