"""Property tests: ``switchable_batch_norm`` against per-block ``F.batch_norm`` (reference.py).

Random layers (C channels, S statistics rows), block tables (overlapping in eval, disjoint per
row in training), rank 2..5 inputs, batch 0 and single-value batches, momentum (incl. None with
a counter), fused activations, affine or not, dtypes and memory layouts, on the C++ and the
pure-torch backends. Compared: the output, the three gradients, and the running statistics and
counters written in place. Invalid calls must raise an error that names the problem.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import ref_switchable_batch_norm
from slimkern.ops import switchable_batch_norm

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@st.composite
def bn_problem(draw):
    C, S = draw(st.integers(1, 8)), draw(st.integers(1, 3))
    blocks, rows = [], []
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, C - 1))
        blocks.append((a, draw(st.integers(a + 1, C))))
        rows.append(draw(st.integers(0, S - 1)))
    spatial = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    return dict(C=C, S=S, blocks=blocks, rows=rows, shape=(draw(st.sampled_from([0, 1, 2, 3])),
                sum(b - a for a, b in blocks), *spatial), training=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, None])), affine=draw(st.booleans()),
                activation=draw(st.sampled_from(["none", "relu", "relu6"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                backend=draw(st.sampled_from([None, "torch"])), table=draw(st.sampled_from(["list", "tensor"])),
                seed=draw(st.integers(0, 2**16)))


def _overlap_same_row(p) -> bool:
    for g, (a, b) in enumerate(p["blocks"]):
        for h in range(g + 1, len(p["blocks"])):
            c, d = p["blocks"][h]
            if p["rows"][g] == p["rows"][h] and max(a, c) < min(b, d):
                return True
    return False


def _laid_out(x, layout):
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def _inputs(p):
    g = torch.Generator().manual_seed(p["seed"])
    dt, C, S = p["dtype"], p["C"], p["S"]
    x = (3 * torch.randn(p["shape"], generator=g, dtype=torch.float64) + 1).to(dt)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dt) if p["affine"] else None
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dt) if p["affine"] else None
    rm = torch.randn(S, C, generator=g, dtype=torch.float64).to(dt)
    rv = (torch.rand(S, C, generator=g, dtype=torch.float64) + 0.5).to(dt)
    nbt = torch.randint(0, 5, (S,), generator=g)
    return _laid_out(x, p["layout"]), w, b, rm, rv, nbt


def _call(p, x, w, b, rm, rv, nbt):
    blocks = torch.tensor(p["blocks"]) if p["table"] == "tensor" else p["blocks"]
    return switchable_batch_norm(x, w, b, rm, rv, blocks, p["rows"], p["training"], p["momentum"], 1e-5,
                                 p["activation"], backend=p["backend"], num_batches_tracked=nbt)


@FUZZ
@given(bn_problem())
def test_matches_per_block_batch_norm(p):
    x, w, b, rm, rv, nbt = _inputs(p)
    per_channel = math.prod(p["shape"]) // p["shape"][1]
    if p["training"] and _overlap_same_row(p):
        with pytest.raises((ValueError, RuntimeError), match="both update channels|more than 1 value"):
            _call(p, x, w, b, rm.clone(), rv.clone(), nbt.clone())
        return
    if p["training"] and per_channel == 1:
        with pytest.raises((ValueError, RuntimeError), match="more than 1 value per channel"):
            _call(p, x, w, b, rm.clone(), rv.clone(), nbt.clone())
        return
    leaves = [x.detach().clone().requires_grad_()] + [t.detach().clone().requires_grad_() for t in (w, b)
                                                       if t is not None]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    wb = (leaves[1], leaves[2]) if p["affine"] else (None, None)
    ref_wb = (ref_leaves[1], ref_leaves[2]) if p["affine"] else (None, None)
    got_stats, ref_stats = (rm.clone(), rv.clone(), nbt.clone()), (rm.clone(), rv.clone(), nbt.clone())
    y = _call(p, leaves[0], *wb, *got_stats)
    ref = ref_switchable_batch_norm(ref_leaves[0], *ref_wb, ref_stats[0], ref_stats[1], p["blocks"], p["rows"],
                                    p["training"], p["momentum"], 1e-5, p["activation"], ref_stats[2])
    tol = TOL[p["dtype"]]
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, **tol)
    for name, got, want in zip(("running_mean", "running_var", "num_batches_tracked"), got_stats, ref_stats):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    g_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(p["seed"] + 1),
                        dtype=torch.float64).to(p["dtype"])
    grads = torch.autograd.grad(y, leaves, g_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_out, allow_unused=True)
    for name, got, want, leaf in zip(("x", "weight", "bias"), grads, ref_grads, leaves):
        want = torch.zeros_like(leaf) if want is None else want
        got = torch.zeros_like(leaf) if got is None else got
        # single-value-per-channel eval and wide random data keep this well conditioned
        torch.testing.assert_close(got, want, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10,
                                   msg=lambda m: f"grad {name}: {m}")


@settings(FUZZ, max_examples=60)
@given(bn_problem(), st.data())
def test_nan_and_inf_stay_in_their_channel(p, data):
    """A NaN/inf input poisons only its own channel (training: the whole channel via the batch
    statistics), exactly as in the reference."""
    if p["shape"][0] == 0 or (p["training"] and (_overlap_same_row(p) or math.prod(p["shape"]) // p["shape"][1] == 1)):
        return
    x, w, b, rm, rv, nbt = _inputs(p)
    x = x.clone()
    idx = tuple(data.draw(st.integers(0, s - 1)) for s in x.shape)
    x[idx] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    got_stats, ref_stats = (rm.clone(), rv.clone(), nbt.clone()), (rm.clone(), rv.clone(), nbt.clone())
    y = _call(p, x, w, b, *got_stats)
    ref = ref_switchable_batch_norm(x, w, b, ref_stats[0], ref_stats[1], p["blocks"], p["rows"], p["training"],
                                    p["momentum"], 1e-5, p["activation"], ref_stats[2])
    assert torch.equal(y.isnan(), ref.isnan())
    torch.testing.assert_close(y, ref, equal_nan=True, **TOL[p["dtype"]])
    for got, want in zip(got_stats[:2], ref_stats[:2]):
        # F.batch_norm's running mean of [inf, 0.5] is inf where a one-pass (Welford) mean is NaN:
        # both poisoned; what must hold is that exactly the reference's non-finite entries are.
        assert torch.equal(got.isfinite(), want.isfinite())
        torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], **TOL[p["dtype"]])


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("shape", [(0, 6), (0, 6, 3, 3), (4, 6, 0, 3)])
def test_empty_batch_in_training_returns_empty_output_as_torch_does(backend, shape):
    """nn.BatchNorm2d on an empty batch: empty output, running statistics unchanged, the batch
    counted; gradients of the affine parameters are zero."""
    bn = torch.nn.BatchNorm1d(6) if len(shape) == 2 else torch.nn.BatchNorm2d(6)
    bn.train()
    x = torch.randn(shape)
    want = bn(x)
    rm, rv, nbt = torch.zeros(2, 6), torch.ones(2, 6), torch.zeros(2, dtype=torch.long)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    y = switchable_batch_norm(x, w, b, rm, rv, [(0, 4), (4, 6)], [1, 1], True, 0.1, backend=backend,
                              num_batches_tracked=nbt)
    assert y.shape == want.shape
    torch.testing.assert_close(rm, torch.zeros(2, 6))
    torch.testing.assert_close(rv, torch.ones(2, 6))
    assert nbt.tolist() == [0, int(bn.num_batches_tracked)]
    y.sum().backward()
    assert w.grad is not None and not w.grad.any() and not b.grad.any()


def _bn(**kw):
    args = dict(x=torch.randn(2, 8, 3, 3), weight=None, bias=None, running_mean=torch.zeros(2, 8),
                running_var=torch.ones(2, 8), blocks=[(0, 8)], stat_rows=[0], training=True)
    args.update(kw)
    return switchable_batch_norm(**args)


BIG = [2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**31), -(2**63)]


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_huge_table_entries_are_refused(value, backend):
    with pytest.raises((ValueError, RuntimeError), match="block 0|blocks"):
        _bn(blocks=[(0, value)], backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="stat_rows"):
        _bn(stat_rows=[value], backend=backend)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(blocks=[(0, 7.5)]), TypeError, "blocks"),
    (dict(blocks=[(0, 8.0)]), TypeError, "blocks"),
    (dict(blocks=[(False, True)], x=torch.randn(2, 1)), TypeError, "blocks"),
    (dict(blocks=torch.tensor([[0.0, 8.0]])), TypeError, "blocks"),
    (dict(blocks=[]), (ValueError, RuntimeError), "empty"),
    (dict(blocks=[(3, 3)], x=torch.randn(2, 0)), (ValueError, RuntimeError), "empty"),
    (dict(stat_rows=[0.5]), TypeError, "stat_rows"),
    (dict(stat_rows=[True]), TypeError, "stat_rows"),
    (dict(stat_rows=[0, 0]), (ValueError, RuntimeError), "stat_rows"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=math.nan), ValueError, "eps"),
    (dict(eps=math.inf), ValueError, "eps"),
    (dict(momentum=math.nan), ValueError, "momentum"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(momentum=None), ValueError, "num_batches_tracked"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(x=torch.randn(2, 7, 3)), (ValueError, RuntimeError), "channel"),
    (dict(x=torch.randn(8)), (ValueError, RuntimeError), r"\[N, C\]"),
    (dict(x=torch.randn(1, 8, 1, 1)), (ValueError, RuntimeError), "more than 1 value"),
    (dict(running_mean=torch.zeros(8)), (ValueError, RuntimeError), "running_mean"),
    (dict(weight=torch.ones(8, dtype=torch.float64)), (TypeError, RuntimeError), "weight"),
    (dict(weight=torch.ones(7)), (ValueError, RuntimeError), "weight"),
])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_bad_arguments_name_the_problem(kw, exc, match, backend):
    rm = kw.get("running_mean", torch.zeros(2, 8))
    snapshot = rm.clone()
    with pytest.raises(exc, match=match):
        _bn(backend=backend, **kw)
    assert torch.equal(rm, snapshot), "a refused call must not write the running statistics"


def test_forward_switches_on_an_empty_batch_gives_one_empty_output_per_switch():
    import slimkern as sk

    net = sk.slimmify(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)))
    net.train()
    outs = sk.forward_switches(net, torch.randn(0, 3, 6, 6), ["[1.0]x", "[0.5, 0.5]x"])
    assert [tuple(o.shape) for o in outs] == [(0, 5), (0, 5)]
