"""Property tests: ``block_conv2d`` against the pure-torch reference over random geometry.

Random weight shapes, block tables (overlapping, disjoint, shared input), x offsets, strides,
paddings, dilations, dtypes, memory layouts, batch 0 and 1x1 maps; forward and all three
gradients are compared with ``reference.ref_block_conv2d`` (index_select + F.conv2d + autograd).
Invalid geometry must raise an error that names the argument. Deterministic: hypothesis runs
derandomized with a bounded number of examples.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import ref_block_conv2d
from slimkern.ops import block_conv2d

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the given memory layout (same shape)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor, and the channel axis last
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[..., ::2]
    return t.contiguous()


@st.composite
def conv_problem(draw):
    depthwise = draw(st.booleans())
    c_out = draw(st.integers(1, 7))
    c_in = 1 if depthwise else draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    in_extent = c_out if depthwise else c_in
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        o0 = draw(st.integers(0, c_out - 1))
        o1 = draw(st.integers(o0 + 1, c_out))
        if depthwise:
            i0, i1 = o0, o1
        else:
            i0 = draw(st.integers(0, in_extent - 1))
            i1 = draw(st.integers(i0 + 1, in_extent))
        blocks.append((i0, i1, o0, o1))
    sizes = [b[1] - b[0] for b in blocks]
    extra = draw(st.integers(0, 2))
    x_channels = sum(sizes) + extra
    offsets_kind = draw(st.sampled_from(["packed", "random", "shared"]))
    if offsets_kind == "packed" and extra == 0:
        offsets = None
    elif offsets_kind == "shared":
        x_channels = max(sizes) + extra
        offsets = [0] * len(blocks)
    else:
        offsets = [draw(st.integers(0, x_channels - s)) for s in sizes]
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    n = draw(st.sampled_from([0, 1, 2, 3]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return dict(depthwise=depthwise, wshape=(c_out, c_in, kh, kw), blocks=blocks, offsets=offsets,
                xshape=(n, x_channels, h, w), stride=stride, padding=padding, dilation=dilation,
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                seed=draw(st.integers(0, 2**16)))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _fits(p) -> bool:
    for ax in range(2):
        span = _pair(p["dilation"])[ax] * (p["wshape"][2 + ax] - 1) + 1
        if p["xshape"][2 + ax] + 2 * _pair(p["padding"])[ax] < span:
            return False
    return True


def _tensors(p, dtype=None):
    dtype = dtype or p["dtype"]
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["xshape"], generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(p["wshape"], generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(p["wshape"][0], generator=g, dtype=torch.float64).to(dtype) if p["bias"] else None
    return laid_out(x, p["layout"]), w, b


def _call(fn, p, x, w, b):
    return fn(x, w, b, p["blocks"], p["offsets"], stride=p["stride"], padding=p["padding"],
              dilation=p["dilation"], depthwise=p["depthwise"])


@FUZZ
@given(conv_problem())
def test_forward_and_gradients_match_reference(p):
    x, w, b = _tensors(p)
    if not _fits(p):
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            _call(block_conv2d, p, x, w, b)
        return
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = _call(block_conv2d, p, *leaves, *([None] if b is None else []))
    ref = _call(ref_block_conv2d, p, *ref_leaves, *([None] if b is None else []))
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[p["dtype"]])
    g_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(p["seed"] + 1),
                        dtype=torch.float64).to(p["dtype"])
    grads = torch.autograd.grad(y, leaves, g_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_out, allow_unused=True)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        want = torch.zeros_like(leaves[0] if name == "x" else leaves[1]) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, **TOL[p["dtype"]], msg=lambda m: f"grad {name}: {m}")


@FUZZ
@given(conv_problem(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_low_precision_matches_float64_reference(p, dtype):
    if not _fits(p):
        return
    x, w, b = _tensors(p, dtype)
    y = _call(block_conv2d, p, x, w, b)
    assert y.dtype == dtype
    ref = _call(ref_block_conv2d, p, x.double(), w.double(), None if b is None else b.double())
    scale = 1.0 + math.prod(p["wshape"][1:]) ** 0.5  # the sum's magnitude grows with the fan-in
    torch.testing.assert_close(y.double(), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


@settings(FUZZ, max_examples=60)
@given(conv_problem(), st.data())
def test_nan_and_inf_propagate_like_the_reference(p, data):
    if not _fits(p) or p["xshape"][0] == 0:
        return
    x, w, b = _tensors(p)
    x = x.clone()
    for value in (math.nan, math.inf, -math.inf):
        idx = tuple(data.draw(st.integers(0, s - 1)) for s in x.shape)
        x[idx] = value
    y = _call(block_conv2d, p, x, w, b)
    ref = _call(ref_block_conv2d, p, x, w, b)
    assert torch.equal(y.isnan(), ref.isnan())
    torch.testing.assert_close(y, ref, equal_nan=True, **TOL[p["dtype"]])


# --- adversarial arguments: a clear error naming the argument, never a crash ------------------

BIG = [2**31 - 1, 2**31, 2**32, 2**32 + 3, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**31), -(2**63)]


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize("column", range(4))
def test_block_entries_near_integer_limits_are_refused(value, column):
    x, w, b = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3), torch.randn(8)
    row = [0, 6, 0, 8]
    row[column] = value
    with pytest.raises(ValueError, match=r"block 0"):
        block_conv2d(x, w, b, [row], padding=1)
    if -(2**63) <= value < 2**63:
        with pytest.raises(ValueError, match=r"block 0"):
            block_conv2d(x, w, b, torch.tensor([row]), padding=1)


@pytest.mark.parametrize("value", BIG)
def test_x_offsets_near_integer_limits_are_refused(value):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    with pytest.raises(ValueError, match=r"block 0 reads input channels"):
        block_conv2d(x, w, None, [(0, 6, 0, 8)], x_offsets=[value], padding=1)


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
@pytest.mark.parametrize("value", [2**31, 2**40, 2**62, 2**63 - 1, 2**64])
def test_huge_geometry_is_refused_naming_the_argument(name, value):
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match=name):
        block_conv2d(x, w, None, [(0, 2, 0, 2)], **{"padding": 1, name: value})


@pytest.mark.parametrize("bad, name", [
    ([(0, 5.5, 0, 8)], "blocks"), ([(0, 6.0, 0, 8)], "blocks"), ([(False, True, 0, 8)], "blocks"),
    ([(0, "6", 0, 8)], "blocks"), (torch.tensor([[0.0, 6.0, 0.0, 8.0]]), "blocks"),
    (torch.tensor([[True, True, True, True]]), "blocks"),
])
def test_non_integer_block_entries_are_refused(bad, name):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    with pytest.raises(TypeError, match=name):
        block_conv2d(x, w, None, bad, padding=1)


@pytest.mark.parametrize("bad", [[0.5], [0.0], [True], torch.tensor([0.0]), torch.tensor([False]), ["0"]])
def test_non_integer_x_offsets_are_refused(bad):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    with pytest.raises(TypeError, match="x_offsets"):
        block_conv2d(x, w, None, [(0, 6, 0, 8)], x_offsets=bad, padding=1)


def test_integer_like_arguments_are_accepted():
    np = pytest.importorskip("numpy")
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    want = ref_block_conv2d(x, w, None, [(0, 6, 0, 8)], [0], padding=1)
    for blocks, offs in (([(np.int64(0), np.int32(6), 0, 8)], [np.int64(0)]),
                         (torch.tensor([[0, 6, 0, 8]], dtype=torch.int32), torch.tensor([0], dtype=torch.int16)),
                         (np.array([[0, 6, 0, 8]]), np.array([0]))):
        torch.testing.assert_close(block_conv2d(x, w, None, blocks, offs, padding=1), want)


@pytest.mark.parametrize("bad", [[], [(0, 0, 0, 8)], [(0, 6, 3, 3)], torch.zeros(0, 4, dtype=torch.long)])
def test_empty_block_tables_are_refused(bad):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    with pytest.raises(ValueError, match="empty"):
        block_conv2d(x, w, None, bad, padding=1)


def test_zero_channel_input_and_empty_maps():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="channel"):
        block_conv2d(torch.randn(2, 0, 5, 5), w, None, [(0, 3, 0, 4)])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        block_conv2d(torch.randn(2, 3, 0, 5), w, None, [(0, 3, 0, 4)], padding=1)
