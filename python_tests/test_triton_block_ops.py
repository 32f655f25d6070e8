"""Triton block_conv2d / block_linear kernels against a pure-torch reference.

Run with the interpreter on CPU (set before import):
    TRITON_INTERPRET=1 python -m pytest python_tests -m triton
On a machine with a GPU, without TRITON_INTERPRET, the same tests run on CUDA tensors.
Shapes are small because the interpreter executes every program in numpy.
"""
import os

import pytest
import torch

# The reference must not use TF32 either, or fp32 comparisons need loose tolerances.
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("exact_fp32")]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton tests need TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")

from block_cases import CONV_CASES, LINEAR_CASES, flat as _flat, make_conv_inputs  # noqa: E402
from block_cases import ref_block_conv2d, ref_block_linear  # noqa: E402
from slimkern.triton import block_conv2d as tconv  # noqa: E402
from slimkern.triton import block_linear as tlin  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _conv_inputs(case, dtype=torch.float32, bias=True, noncontig=False, seed=0):
    return make_conv_inputs(case, DEVICE, dtype=dtype, bias=bias, noncontig=noncontig, seed=seed)


def _ref_conv_grads(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy):
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    y = ref_block_conv2d(xr, wr, br, torch.tensor(blocks), offs, stride, padding, dilation, depthwise)
    y.backward(gy.double())
    return y.detach(), xr.grad, wr.grad, (br.grad if br is not None else None)


@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_forward_and_grads_fp32(case, noncontig):
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(case, noncontig=noncontig)
    flat = _flat(blocks)
    y = tconv.forward(x, w, b, flat, offs, stride, padding, dilation, depthwise)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(DEVICE)
    y_ref, gx_ref, gw_ref, gb_ref = _ref_conv_grads(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    gx, gw, gb = tconv.backward(gy, x, w, flat, offs, stride, padding, dilation, depthwise, (True, True, True))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (w.shape[0],)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-4, atol=1e-4)


SPLIT_CASES = [  # enough pixels (N*Ho*Wo = 4*16*16) that the reductions split into several pieces
    ("split_dense", 4, 6, 16, 16, (8, 4, 3, 3), [(0, 4, 0, 8), (0, 2, 0, 4)], [0, 4], 1, 1, 1, False),
    ("split_dw", 4, 6, 16, 16, (4, 1, 3, 3), [(0, 4, 0, 4), (0, 2, 0, 2)], [0, 4], 1, 1, 1, True),
]


@pytest.mark.parametrize("split_k", [1, 5])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_conv_split_reductions(case, split_k):
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(case)
    flat = _flat(blocks)
    y = tconv.forward(x, w, b, flat, offs, stride, padding, dilation, depthwise)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float32).to(DEVICE)
    _, _, gw_ref, gb_ref = _ref_conv_grads(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy)
    _, gw, gb = tconv.backward(gy, x, w, flat, offs, stride, padding, dilation, depthwise, (False, True, True),
                               split_k=split_k)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-4, atol=1e-4)


def test_conv_weight_grad_is_zero_outside_blocks_and_summed_on_overlap():
    case = CONV_CASES[0]  # blocks (0,6,0,8) and (0,3,0,4): the [0:4, 0:3] corner is read twice
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(case, bias=False)
    y = tconv.forward(x, w, None, _flat(blocks), offs, stride, padding, dilation, depthwise)
    gy = torch.zeros_like(y)
    gy[:, 8:] = 1.0  # only the second (0.5x) block's output: its grad lives in the corner only
    _, gw, _ = tconv.backward(gy, x, w, _flat(blocks), offs, stride, padding, dilation, depthwise,
                              (False, True, False))
    assert gw[:4, :3].abs().sum() > 0
    assert gw[4:].abs().sum() == 0 and gw[:, 3:].abs().sum() == 0


def test_conv_output_mask_gives_empty_tensors():
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(CONV_CASES[1])
    y = tconv.forward(x, w, b, _flat(blocks), offs, stride, padding, dilation, depthwise)
    gy = torch.ones_like(y)
    gx, gw, gb = tconv.backward(gy, x, w, _flat(blocks), offs, stride, padding, dilation, depthwise,
                                (False, False, True))
    assert gx.numel() == 0 and gw.numel() == 0
    # d(sum y)/d bias[c] = number of output pixels per channel, once per block reading c.
    expected = torch.full((8,), float(y.shape[0] * y.shape[2] * y.shape[3]), dtype=torch.float32, device=DEVICE)
    torch.testing.assert_close(gb, expected)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[5]], ids=["dense", "depthwise"])
def test_conv_forward_fp16(case):
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(case, dtype=torch.float16)
    y = tconv.forward(x, w, b, _flat(blocks), offs, stride, padding, dilation, depthwise)
    assert y.dtype == torch.float16
    y_ref = ref_block_conv2d(x.double(), w.double(), b.double(), torch.tensor(blocks), offs, stride, padding,
                             dilation, depthwise)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_conv_backward_fp16_grads_close():
    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(CONV_CASES[2], dtype=torch.float16)
    flat = _flat(blocks)
    y = tconv.forward(x, w, b, flat, offs, stride, padding, dilation, depthwise)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    _, gx_ref, gw_ref, gb_ref = _ref_conv_grads(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy)
    gx, gw, gb = tconv.backward(gy, x, w, flat, offs, stride, padding, dilation, depthwise, (True, True, True))
    assert gx.dtype == gw.dtype == gb.dtype == torch.float16
    for got, ref in ((gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_forward_and_grads_fp32(case, bias):
    _, N, cx, wshape, blocks, offs = case
    gen = torch.Generator().manual_seed(5)
    x = _rand(cx, N, gen=gen).t()  # non-contiguous x
    w = _rand(wshape[0], wshape[1] + 4, gen=gen)[:, 4:]  # a strided weight view
    b = _rand(wshape[0], gen=gen) if bias else None
    flat = _flat(blocks)
    y = tlin.forward(x, w, b, flat, offs)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if bias else None
    y_ref = ref_block_linear(xr, wr, br, torch.tensor(blocks), offs)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-4)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float32).to(DEVICE)
    y_ref.backward(gy.double())
    gx, gw, gb = tlin.backward(gy, x, w, flat, offs, (True, True, bias))
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gx.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), wr.grad, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(gb.double(), br.grad, rtol=1e-4, atol=1e-4)
    else:
        assert gb.numel() == 0


def test_linear_forward_fp16():
    _, N, cx, wshape, blocks, offs = LINEAR_CASES[0]
    gen = torch.Generator().manual_seed(7)
    x, w, b = _rand(N, cx, dtype=torch.float16, gen=gen), _rand(*wshape, dtype=torch.float16, gen=gen), None
    y = tlin.forward(x, w, b, _flat(blocks), offs)
    y_ref = ref_block_linear(x.double(), w.double(), None, torch.tensor(blocks), offs)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=3e-2)


# ------------------------------------------------------------------------------ bad inputs
def _good_conv():
    x, w, b, blocks, offs, *_ = _conv_inputs(CONV_CASES[0])
    return x, w, b, _flat(blocks), offs


@pytest.mark.parametrize("mutate, error, text", [
    (lambda a: a.update(blocks=[0, 7, 0, 8, 0, 3, 0, 4]), ValueError, "not inside the weight's 6 input channels"),
    (lambda a: a.update(blocks=[0, 6, 0, 8, 0, 3, 5, 4]), ValueError, "stop < start"),
    (lambda a: a.update(blocks=[], offs=[]), ValueError, "at least one block"),
    (lambda a: a.update(blocks=[0, 6, 0, 8, 0, 3, 0]), ValueError, "4 entries per block"),
    (lambda a: a.update(offs=[0, 7]), ValueError, "x's channel count does not match the blocks"),
    (lambda a: a.update(offs=[0]), ValueError, "x_offsets has 1 entries but there are 2 blocks"),
    (lambda a: a.update(x=a["x"][0]), ValueError, "x has the wrong rank"),
    (lambda a: a.update(w=a["w"].double()), RuntimeError, "must have the same dtype"),
    (lambda a: a.update(b=a["b"][:3]), ValueError, "bias must have shape [8]"),
    (lambda a: a.update(stride=0), ValueError, "stride must be positive"),
])
def test_conv_bad_inputs(mutate, error, text):
    x, w, b, flat, offs = _good_conv()
    args = dict(x=x, w=w, b=b, blocks=flat, offs=offs, stride=1)
    mutate(args)
    with pytest.raises(error, match=_escape(text)):
        tconv.forward(args["x"], args["w"], args["b"], args["blocks"], args["offs"], args["stride"], 1, 1, False)


def test_conv_bad_depthwise_and_grad_out():
    x, w, b, blocks, offs, stride, padding, dilation, _ = _conv_inputs(CONV_CASES[5])
    with pytest.raises(ValueError, match="equal input and output ranges"):
        tconv.forward(x, w, b, [0, 8, 0, 4], [0], stride, padding, dilation, True)
    x2, w2, *_ = _conv_inputs(CONV_CASES[0])
    with pytest.raises(ValueError, match=_escape("depthwise weight must have shape [C, 1, kh, kw]")):
        tconv.forward(x2, w2, None, [0, 6, 0, 6], [0], 1, 1, 1, True)
    y = tconv.forward(x, w, b, _flat(blocks), offs, stride, padding, dilation, True)
    with pytest.raises(ValueError, match="grad_out has shape"):
        tconv.backward(y[:, :3], x, w, _flat(blocks), offs, stride, padding, dilation, True, (True, True, True))


def test_unsupported_dtype_says_why():
    x, w, *_ = _good_conv()
    reasons = tconv.not_supported_reasons(x.double(), w.double())
    assert any("float64" in r for r in reasons)
    with pytest.raises(RuntimeError, match="not supported by the Triton kernels"):
        tconv.forward(x.double(), w.double(), None, [0, 6, 0, 8], [0], 1, 1, 1, False)


def test_linear_bad_rank():
    with pytest.raises(ValueError, match="block_linear: x has the wrong rank"):
        tlin.forward(_rand(2, 3, 4), _rand(4, 3), None, [0, 3, 0, 4], [0])


def _escape(text):
    import re

    return re.escape(text)


# ------------------------------------------------- through the public ops (autograd.Function)
def test_public_ops_with_triton_backend_match_reference():
    import slimkern as sk

    x, w, b, blocks, offs, stride, padding, dilation, depthwise = _conv_inputs(CONV_CASES[5], noncontig=True)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = sk.ops.block_conv2d(x, w, b, blocks, offs, stride, padding, dilation, depthwise, backend="triton")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float32).to(DEVICE)
    y.backward(gy)
    y_ref, gx_ref, gw_ref, gb_ref = _ref_conv_grads(x, w, b, blocks, offs, stride, padding, dilation, depthwise, gy)
    for got, ref in ((y.detach(), y_ref), (x.grad, gx_ref), (w.grad, gw_ref), (b.grad, gb_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)

    _, N, cx, wshape, lblocks, loffs = LINEAR_CASES[2]
    gen = torch.Generator().manual_seed(9)
    xl, wl = _rand(N, cx, gen=gen).requires_grad_(), _rand(*wshape, gen=gen).requires_grad_()
    yl = sk.ops.block_linear(xl, wl, None, lblocks, loffs, backend="triton")
    yl.sum().backward()
    xr, wr = xl.detach().double().requires_grad_(), wl.detach().double().requires_grad_()
    ref_block_linear(xr, wr, None, torch.tensor(lblocks), loffs).sum().backward()
    torch.testing.assert_close(xl.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wl.grad.double(), wr.grad, rtol=1e-4, atol=1e-4)
