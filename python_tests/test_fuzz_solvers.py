"""Property tests: ``viterbi``, ``viterbi_marginals``, ``viterbi_budget`` against brute force over all K^L paths,
and ``sinkhorn`` against POT (``ot.sinkhorn_log``) and its own fixed-point conditions.

Random chains (L, K, batch P including 0), +inf-forbidden choices and transitions (up to every
path forbidden), float32/float64, numpy or torch, contiguous or transposed; Sinkhorn over random
histograms with zero entries, batch 0, 1x1 problems and non-contiguous costs, on the C++ and the
pure-torch backends. NaN/-inf costs must be refused naming the argument.
"""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimkern.solvers import sinkhorn, viterbi, viterbi_marginals

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def chain(draw):
    P, L, K = draw(st.sampled_from([None, 0, 1, 3])), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lead = () if P is None else (P,)
    u = torch.randn(*lead, L, K, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 10.0, 1e-3]))
    p = torch.randn(*lead, L - 1, K, K, generator=g, dtype=torch.float64)
    forbid = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    u[torch.rand(u.shape, generator=g) < forbid * 0.5] = math.inf
    p[torch.rand(p.shape, generator=g) < forbid] = math.inf
    return dict(u=u, p=p, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                backend=draw(st.sampled_from(["auto", "torch"])),
                form=draw(st.sampled_from(["tensor", "numpy", "transposed"])))


def _form(t, form):
    if form == "numpy":
        return t.numpy()
    if form == "transposed":  # same values, non-contiguous storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _brute(u, p):
    """All K^L paths of one chain: (costs [K^L] float64, paths [K^L, L])."""
    L, K = u.shape
    paths = torch.tensor(list(itertools.product(range(K), repeat=L)), dtype=torch.long).reshape(-1, L)
    cost = u[torch.arange(L), paths].sum(1)
    for l in range(L - 1):
        cost = cost + p[l, paths[:, l], paths[:, l + 1]]
    return cost, paths


def _problems(c):
    u, p = c["u"].to(c["dtype"]).double(), c["p"].to(c["dtype"]).double()
    return (u, p, False) if u.dim() == 2 else (u, p, True)


@FUZZ
@given(chain())
def test_viterbi_matches_brute_force(c):
    u, p, batched = _problems(c)
    path, cost = viterbi(_form(c["u"].to(c["dtype"]), c["form"]), _form(c["p"].to(c["dtype"]), c["form"]),
                         backend=c["backend"])
    path, cost = torch.as_tensor(path), torch.as_tensor(cost)
    us, ps = (u, p) if batched else (u[None], p[None])
    path, cost = (path, cost) if batched else (path[None], cost[None])
    assert path.shape == us.shape[:2] and cost.shape == us.shape[:1]
    tol = 1e-4 if c["dtype"] == torch.float32 else 1e-10
    for k in range(us.shape[0]):
        costs, paths = _brute(us[k], ps[k])
        best = costs.min()
        if math.isinf(best):
            assert math.isinf(cost[k]) and (path[k] == -1).all()
            continue
        assert abs(float(cost[k]) - float(best)) <= tol * (1 + abs(float(best)))
        # the returned path really costs what is returned
        idx = int((paths == path[k]).all(1).nonzero()[0])
        assert abs(float(costs[idx]) - float(best)) <= tol * (1 + abs(float(best)))


@FUZZ
@given(chain(), st.sampled_from([1e-2, 0.3, 1.0, 10.0, 1e3]))
def test_viterbi_marginals_match_brute_force(c, temperature):
    u, p, batched = _problems(c)
    marg, log_z = viterbi_marginals(_form(c["u"].to(c["dtype"]), c["form"]),
                                    _form(c["p"].to(c["dtype"]), c["form"]), temperature,
                                    return_log_partition=True, backend=c["backend"])
    marg, log_z = torch.as_tensor(marg).double(), torch.as_tensor(log_z).double()
    us, ps = (u, p) if batched else (u[None], p[None])
    marg, log_z = (marg, log_z) if batched else (marg[None], log_z[None])
    tol = 2e-4 if c["dtype"] == torch.float32 else 1e-9
    for k in range(us.shape[0]):
        costs, paths = _brute(us[k], ps[k])
        lz = torch.logsumexp(-costs / temperature, 0)
        if math.isinf(lz):
            assert torch.isnan(marg[k]).all() and log_z[k] == -math.inf
            continue
        w = torch.exp(-costs / temperature - lz)
        want = torch.zeros_like(us[k])
        for l in range(us.shape[1]):
            want[l].index_add_(0, paths[:, l], w)
        torch.testing.assert_close(marg[k], want, rtol=tol, atol=tol)
        assert abs(float(log_z[k]) - float(lz)) <= tol * (1 + abs(float(lz)))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("fn", ["viterbi", "viterbi_marginals"])
@pytest.mark.parametrize("bad, match", [(math.nan, "unary contains NaN"), (-math.inf, "unary contains -inf")])
def test_nan_and_minus_inf_costs_are_refused(fn, bad, match, backend):
    u, p = torch.randn(3, 4), torch.randn(2, 4, 4)
    u[1, 2] = bad
    with pytest.raises(ValueError, match=match):
        (viterbi if fn == "viterbi" else viterbi_marginals)(u, p, backend=backend)
    u[1, 2] = 0.0
    p[0, 1, 1] = bad
    with pytest.raises(ValueError, match=match.replace("unary", "pairwise")):
        (viterbi if fn == "viterbi" else viterbi_marginals)(u, p, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("temperature", [1e-3, 1e-2])
def test_marginals_at_small_temperature_are_the_viterbi_path(backend, temperature):
    g = torch.Generator().manual_seed(1)
    u, p = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3, torch.randn(4, 4, 4, generator=g,
                                                                                 dtype=torch.float64) * 3
    path, _ = viterbi(u, p, backend=backend)
    marg = viterbi_marginals(u, p, temperature, backend=backend)
    assert torch.isfinite(marg).all()
    torch.testing.assert_close(marg.sum(1), torch.ones(5, dtype=torch.float64))
    assert (marg.argmax(1) == path).all()


def _tiny_temperature_case(which):
    if which == "subnormal":
        return (torch.tensor([[0.0, 1.0], [2.0, 0.5]], dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64),
                1e-310)
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, generator=g), torch.randn(2, 4, 4, generator=g), 1e-300


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("which", ["subnormal", "1e-300"])
def test_marginals_at_a_temperature_that_overflows_the_costs_are_not_silently_wrong(backend, which):
    """cost / T near the float64 limits: either an error naming temperature or finite marginals
    summing to 1 (the one-hot path). It was: NaN everywhere (T=1e-310, both backends), +inf
    probabilities (C++) or all-zero rows (torch) at T=1e-300."""
    u, p, t = _tiny_temperature_case(which)
    try:
        marg = viterbi_marginals(u, p, t, backend=backend)
    except ValueError as exc:
        assert "temperature" in str(exc)
        return
    assert torch.isfinite(marg).all() and torch.allclose(marg.sum(1), torch.ones_like(marg.sum(1)))


@pytest.mark.parametrize("kw", [dict(reg=True), dict(max_iter=True), dict(check_every=True)])
def test_sinkhorn_refuses_bools_for_numbers(kw):
    a, b = torch.full((3,), 1 / 3, dtype=torch.float64), torch.full((4,), 0.25, dtype=torch.float64)
    args = dict(reg=0.1)
    args.update(kw)
    with pytest.raises((TypeError, ValueError), match=next(iter(kw))):
        sinkhorn(a, b, torch.rand(3, 4, dtype=torch.float64), **args)


# --- Sinkhorn -----------------------------------------------------------------------------------

@st.composite
def ot_problem(draw):
    B = draw(st.sampled_from([None, 0, 1, 3]))
    n, m = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lead = () if B is None else (B,)
    a = torch.rand(*lead, n, generator=g, dtype=torch.float64) + 0.05
    b = torch.rand(*lead, m, generator=g, dtype=torch.float64) + 0.05
    if draw(st.booleans()) and n > 1:
        a[..., draw(st.integers(0, n - 1))] = 0.0  # an empty source bin
    if draw(st.booleans()) and m > 1:
        b[..., draw(st.integers(0, m - 1))] = 0.0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    M = torch.rand(*lead, n, m, generator=g, dtype=torch.float64)
    return dict(a=a, b=b, M=M, reg=draw(st.sampled_from([0.05, 0.2, 1.0])),
                method=draw(st.sampled_from(["log", "standard"])), backend=draw(st.sampled_from(["auto", "torch"])),
                transposed=draw(st.booleans()))


@FUZZ
@given(ot_problem())
def test_sinkhorn_matches_pot_and_its_marginals(c):
    ot = pytest.importorskip("ot")
    M = c["M"].transpose(-1, -2).contiguous().transpose(-1, -2) if c["transposed"] else c["M"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these problems converge: a warning would be a bug
        plan, info = sinkhorn(c["a"], c["b"], M, c["reg"], method=c["method"], max_iter=5000, tol=1e-11,
                              return_info=True, backend=c["backend"])
    batched = c["M"].dim() == 3
    a, b, Ms, plans = ((c["a"], c["b"], c["M"], plan) if batched
                       else (c["a"][None], c["b"][None], c["M"][None], plan[None]))
    assert plans.shape == Ms.shape
    for k in range(Ms.shape[0]):
        want = torch.from_numpy(ot.sinkhorn(a[k].numpy(), b[k].numpy(), Ms[k].numpy(), c["reg"],
                                            method="sinkhorn_log", numItermax=20000, stopThr=1e-13))
        torch.testing.assert_close(plans[k], want, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(plans[k].sum(1), a[k], rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(plans[k].sum(0), b[k], rtol=1e-8, atol=1e-9)
        assert (plans[k][a[k] == 0] == 0).all() and (plans[k][:, b[k] == 0] == 0).all()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("which, bad, match", [
    ("M", math.nan, "M contains NaN or inf"), ("M", math.inf, "M contains NaN or inf"),
    ("a", math.nan, "a contains NaN or inf"), ("b", -math.inf, "b contains NaN or inf"),
    ("a", -0.5, "a must be nonnegative"),
])
def test_sinkhorn_refuses_bad_values_naming_the_argument(backend, which, bad, match):
    args = dict(a=torch.full((3,), 1 / 3, dtype=torch.float64), b=torch.full((4,), 0.25, dtype=torch.float64),
                M=torch.rand(3, 4, dtype=torch.float64))
    args[which] = args[which].clone()
    args[which].view(-1)[1] = bad
    with pytest.raises(ValueError, match=match):
        sinkhorn(args["a"], args["b"], args["M"], 0.1, backend=backend)


@pytest.mark.parametrize("kw, match", [
    (dict(reg=0.0), "reg"), (dict(reg=-1.0), "reg"), (dict(reg=math.nan), "reg"), (dict(reg=math.inf), "reg"),
    (dict(max_iter=-1), "max_iter"), (dict(max_iter=2.5), "max_iter"), (dict(check_every=0), "check_every"),
    (dict(method="exact"), "method"), (dict(tol=math.nan), "tol"), (dict(backend="cuda"), "backend"),
])
def test_sinkhorn_refuses_bad_settings_naming_them(kw, match):
    args = dict(reg=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.full((3,), 1 / 3), torch.full((4,), 0.25), torch.rand(3, 4), **args)


def test_sinkhorn_edge_shapes():
    one = sinkhorn(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                   torch.rand(1, 1, dtype=torch.float64), 0.1)
    torch.testing.assert_close(one, torch.ones(1, 1, dtype=torch.float64))
    empty = sinkhorn(torch.rand(0, 3), torch.rand(0, 4), torch.rand(0, 3, 4), 0.1)
    assert empty.shape == (0, 3, 4)
    with pytest.raises(ValueError, match="must not be empty"):
        sinkhorn(torch.zeros(0), torch.zeros(0), torch.zeros(0, 0), 0.1)
    with pytest.raises(ValueError, match="zero total mass"):
        sinkhorn(torch.zeros(3), torch.zeros(4), torch.rand(3, 4), 0.1)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn(torch.full((3,), 0.5), torch.full((4,), 0.25), torch.rand(3, 4), 0.1)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.full((3,), 1 / 3), torch.full((4,), 0.25), torch.rand(4, 3), 0.1)
    with pytest.raises(TypeError, match="a must be float32 or float64"):
        sinkhorn(np.ones(3, dtype=np.int64), torch.full((4,), 0.75), torch.rand(3, 4), 0.1)


# --- viterbi_budget -----------------------------------------------------------------------------

@st.composite
def budget_chain(draw):
    L, K = draw(st.integers(2, 4)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    u = torch.randn(L, K, generator=g, dtype=torch.float64)
    r = torch.rand(L - 1, K, K, generator=g, dtype=torch.float64) * 10
    c = torch.randn(L - 1, K, K, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    if draw(st.booleans()):
        r[torch.rand(r.shape, generator=g) < 0.2] = math.inf
    return dict(u=u, r=r, c=c, frac=draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0, 1.5])),
                backend=draw(st.sampled_from(["auto", "torch"])))


@FUZZ
@given(budget_chain())
def test_viterbi_budget_against_brute_force(c):
    """The returned path meets the budget, its cost/resource are what it really costs, and no
    path that uses at most its resource is cheaper (the Lagrangian guarantee the docstring
    gives); an infeasible budget is an error that gives the least resource."""
    from slimkern.solvers import viterbi_budget

    u, r, pc = c["u"], c["r"], c["c"]
    costs, paths = _brute(u, torch.zeros_like(r) if pc is None else pc)
    res, _ = _brute(torch.zeros_like(u), r)
    ok = torch.isfinite(costs) & torch.isfinite(res)
    if not ok.any():
        with pytest.raises(ValueError, match="forbidden|infeasible"):
            viterbi_budget(u, r, 1.0, pairwise=pc, backend=c["backend"])
        return
    lo, hi = float(res[ok].min()), float(res[ok].max())
    budget = lo + c["frac"] * (hi - lo) if c["frac"] <= 1.0 else lo - 1.0
    if budget < lo:
        with pytest.raises(ValueError, match="infeasible"):
            viterbi_budget(u, r, budget, pairwise=pc, backend=c["backend"])
        return
    out = viterbi_budget(u, r, budget, pairwise=pc, backend=c["backend"])
    idx = int((paths == out.path).all(1).nonzero()[0])
    assert bool(ok[idx])
    assert float(res[idx]) <= budget + 1e-9
    assert abs(float(out.resource) - float(res[idx])) <= 1e-9 * (1 + abs(float(res[idx])))
    assert abs(float(out.cost) - float(costs[idx])) <= 1e-9 * (1 + abs(float(costs[idx])))
    cheaper = ok & (res <= res[idx] + 1e-9) & (costs < costs[idx] - 1e-9)
    assert not cheaper.any(), "a path using no more resource is cheaper"
