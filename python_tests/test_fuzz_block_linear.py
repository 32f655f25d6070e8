"""Property tests: ``block_linear`` against the pure-torch reference (einsum per block).

Random weight shapes, block tables (overlapping, disjoint, shared input, the ParaDiS classifier's
full-output partial-input blocks), x offsets, dtypes, transposed / strided inputs, batch 0, and
NaN/inf values; forward and gradients against ``reference.ref_block_linear``. Deterministic
(derandomized hypothesis, bounded examples).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import ref_block_linear
from slimkern.ops import block_linear

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided":
        big = torch.zeros(t.shape[0], 3 * t.shape[1], dtype=t.dtype)
        big[:, ::3] = t
        return big[:, ::3]
    return t.contiguous()


@st.composite
def linear_problem(draw):
    c_out, c_in = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        i0 = draw(st.integers(0, c_in - 1))
        i1 = draw(st.integers(i0 + 1, c_in))
        o0 = draw(st.integers(0, c_out - 1))
        o1 = draw(st.integers(o0 + 1, c_out))
        blocks.append((i0, i1, o0, o1))
    sizes = [b[1] - b[0] for b in blocks]
    extra = draw(st.integers(0, 2))
    kind = draw(st.sampled_from(["packed", "random", "shared"]))
    if kind == "shared":
        x_features, offsets = max(sizes) + extra, [0] * len(blocks)
    else:
        x_features = sum(sizes) + extra
        offsets = None if kind == "packed" and extra == 0 else [draw(st.integers(0, x_features - s)) for s in sizes]
    return dict(wshape=(c_out, c_in), blocks=blocks, offsets=offsets, xshape=(draw(st.sampled_from([0, 1, 2, 5])),
                x_features), bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                table=draw(st.sampled_from(["list", "tensor"])), seed=draw(st.integers(0, 2**16)))


def _tensors(p):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["xshape"], generator=g, dtype=torch.float64).to(p["dtype"])
    w = torch.randn(p["wshape"], generator=g, dtype=torch.float64).to(p["dtype"])
    b = torch.randn(p["wshape"][0], generator=g, dtype=torch.float64).to(p["dtype"]) if p["bias"] else None
    return laid_out(x, p["layout"]), w, b


def _blocks(p):
    return torch.tensor(p["blocks"]) if p["table"] == "tensor" else p["blocks"]


@FUZZ
@given(linear_problem())
def test_forward_and_gradients_match_reference(p):
    x, w, b = _tensors(p)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    bias, ref_bias = (leaves[2], ref_leaves[2]) if b is not None else (None, None)
    y = block_linear(leaves[0], leaves[1], bias, _blocks(p), p["offsets"])
    ref = ref_block_linear(ref_leaves[0], ref_leaves[1], ref_bias, p["blocks"], p["offsets"])
    torch.testing.assert_close(y, ref, **TOL[p["dtype"]])
    g_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(p["seed"] + 1),
                        dtype=torch.float64).to(p["dtype"])
    grads = torch.autograd.grad(y, leaves, g_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_out, allow_unused=True)
    for got, want, leaf in zip(grads, ref_grads, leaves):
        want = torch.zeros_like(leaf) if want is None else want
        torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want, **TOL[p["dtype"]])


@settings(FUZZ, max_examples=60)
@given(linear_problem(), st.data())
def test_nan_and_inf_propagate_like_the_reference(p, data):
    if p["xshape"][0] == 0:
        return
    x, w, b = _tensors(p)
    x = x.clone()
    for value in (math.nan, math.inf, -math.inf):
        x[data.draw(st.integers(0, x.shape[0] - 1)), data.draw(st.integers(0, x.shape[1] - 1))] = value
    y = block_linear(x, w, b, _blocks(p), p["offsets"])
    ref = ref_block_linear(x, w, b, p["blocks"], p["offsets"])
    assert torch.equal(y.isnan(), ref.isnan())
    torch.testing.assert_close(y, ref, equal_nan=True, **TOL[p["dtype"]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((5, 30), (24, 20), (24,)))
    blocks, offs = [(0, 20, 0, 24), (0, 10, 0, 12)], [0, 20]
    y = block_linear(x.to(dtype), w.to(dtype), b.to(dtype), blocks, offs)
    assert y.dtype == dtype
    ref = ref_block_linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), blocks, offs)
    torch.testing.assert_close(y.double(), ref, rtol=5e-2, atol=5e-2 * math.sqrt(20))


BIG = [2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**31), -(2**63)]


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize("column", range(4))
def test_block_entries_near_integer_limits_are_refused(value, column):
    row = [0, 6, 0, 8]
    row[column] = value
    with pytest.raises(ValueError, match=r"block 0"):
        block_linear(torch.randn(2, 6), torch.randn(8, 6), None, [row])


@pytest.mark.parametrize("value", BIG)
def test_x_offsets_near_integer_limits_are_refused(value):
    with pytest.raises(ValueError, match=r"block 0 reads input channels"):
        block_linear(torch.randn(2, 6), torch.randn(8, 6), None, [(0, 6, 0, 8)], [value])


@pytest.mark.parametrize("blocks, offs, exc, match", [
    ([(0, 6.5, 0, 8)], None, TypeError, "blocks"),
    ([(0, 6, 0, 8)], [0.25], TypeError, "x_offsets"),
    ([(0, 6, 0, 8)], torch.tensor([0.0]), TypeError, "x_offsets"),
    ([], None, ValueError, "empty"),
    ([(0, 6, 4, 4)], None, ValueError, "empty"),
    ([(0, 6, 0, 8)], [0, 0], ValueError, "x_offsets has 2 entries"),
    (torch.zeros(1, 3, dtype=torch.long), None, ValueError, r"\[G, 4\]"),
])
def test_bad_tables_name_the_argument(blocks, offs, exc, match):
    with pytest.raises(exc, match=match):
        block_linear(torch.randn(2, 6), torch.randn(8, 6), None, blocks, offs)


@pytest.mark.parametrize("x, w, b, match", [
    (torch.randn(2, 6, 1), torch.randn(8, 6), None, "rank"),
    (torch.randn(2, 6), torch.randn(8, 6).double(), None, "dtype"),
    (torch.randn(2, 6).long(), torch.randn(8, 6).long(), None, "floating"),
    (torch.randn(2, 6), torch.randn(8, 6), torch.randn(3), "bias"),
    ([[1.0] * 6] * 2, torch.randn(8, 6), None, "x must be a tensor"),
])
def test_bad_tensors_name_the_argument(x, w, b, match):
    with pytest.raises((TypeError, ValueError), match=match):
        block_linear(x, w, b, [(0, 6, 0, 8)])
