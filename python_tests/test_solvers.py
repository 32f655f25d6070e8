"""slimkern.solvers vs brute-force enumeration (Viterbi family) and POT (Sinkhorn).

Both backends (the C++ op and the pure-torch fallback) are checked against the same
independent references, and against each other.
"""
import itertools
import math
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import slimkern as sk
from slimkern._library import has_op

S = sk.solvers
ot = pytest.importorskip("ot")

needs_cpp = pytest.mark.skipif(not has_op("sinkhorn"), reason="slimkern._C solvers not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch"]


# --------------------------------------------------------------------------- references


def random_chain(rng, L, K, p_inf=0.15, P=None):
    lead = () if P is None else (P,)
    u = rng.uniform(-1, 2, lead + (L, K))
    p = rng.uniform(0, 1, lead + (L - 1, K, K))
    u[rng.random(u.shape) < p_inf] = np.inf
    p[rng.random(p.shape) < p_inf] = np.inf
    return u, p


def path_cost(u, p, path):
    c = sum(u[l, k] for l, k in enumerate(path))
    return c + sum(p[l, path[l], path[l + 1]] for l in range(len(path) - 1))


def all_paths(L, K):
    return itertools.product(range(K), repeat=L)


def brute_min(u, p):
    return min(path_cost(u, p, c) for c in all_paths(*u.shape))


def brute_marginals(u, p, T):
    L, K = u.shape
    costs = {c: path_cost(u, p, c) for c in all_paths(L, K)}
    best = min(costs.values())
    w = {c: math.exp(-(v - best) / T) for c, v in costs.items()}
    z = sum(w.values())
    marg = np.zeros((L, K))
    for c, wc in w.items():
        for l, k in enumerate(c):
            marg[l, k] += wc
    return marg / z, math.log(z) - best / T


def random_ot(rng, n, m, B=None, zeros=False):
    lead = () if B is None else (B,)
    a = rng.random(lead + (n,)) + 0.1
    b = rng.random(lead + (m,)) + 0.1
    if zeros:
        a[..., 0] = 0.0
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return a, b, rng.random(lead + (n, m))


def pot_log(a, b, M, reg):
    return ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)


# --------------------------------------------------------------------------- Viterbi


@pytest.mark.parametrize("backend", BACKENDS)
def test_viterbi_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    feasible = 0
    for L in range(1, 7):
        for K in range(1, 6):
            if K**L > 4000:
                continue
            u, p = random_chain(rng, L, K)
            path, cost = S.viterbi(u, p, backend=backend)
            want = brute_min(u, p)
            if math.isinf(want):
                assert math.isinf(cost) and (path == -1).all()
                continue
            feasible += 1
            assert cost == pytest.approx(want, abs=1e-12)
            assert path_cost(u, p, path) == pytest.approx(want, abs=1e-12)
    assert feasible > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_viterbi_batched_equals_one_by_one(backend):
    rng = np.random.default_rng(1)
    u, p = random_chain(rng, 6, 5, p_inf=0.1, P=9)
    ut, pt = torch.from_numpy(u), torch.from_numpy(p)
    path, cost = S.viterbi(ut, pt, backend=backend)
    assert path.shape == (9, 6) and path.dtype == torch.long
    for k in range(9):
        pk, ck = S.viterbi(ut[k], pt[k], backend=backend)
        assert torch.equal(pk, path[k]) and ck.item() == cost[k].item()


def test_viterbi_float32_and_layer_one():
    rng = np.random.default_rng(2)
    u, p = random_chain(rng, 4, 3, p_inf=0.0)
    path, cost = S.viterbi(torch.tensor(u, dtype=torch.float32), torch.tensor(p, dtype=torch.float32))
    assert cost.dtype == torch.float32
    assert cost.item() == pytest.approx(brute_min(u, p), rel=1e-5)
    path, cost = S.viterbi(np.array([[3.0, 1.0, 2.0]]), np.zeros((0, 3, 3)))
    assert path.tolist() == [1] and cost == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_marginals_match_brute_force_softmin(backend):
    rng = np.random.default_rng(3)
    for T in (1e-3, 0.1, 1.0, 1e3):
        for L, K in ((1, 4), (3, 3), (5, 4), (6, 2)):
            u, p = random_chain(rng, L, K, p_inf=0.1)
            if math.isinf(brute_min(u, p)):
                continue
            want, want_logz = brute_marginals(u, p, T)
            got, logz = S.viterbi_marginals(u, p, T, return_log_partition=True, backend=backend)
            np.testing.assert_allclose(got, want, atol=1e-10)
            assert logz == pytest.approx(want_logz, rel=1e-10, abs=1e-10)
            np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
            assert (got[np.isinf(u)] == 0).all()


def test_marginals_zero_temperature_limit_is_viterbi_path():
    rng = np.random.default_rng(4)
    u, p = random_chain(rng, 6, 5, p_inf=0.1, P=4)
    path, _ = S.viterbi(u, p)
    marg = S.viterbi_marginals(u, p, 1e-4)
    onehot = np.zeros_like(marg)
    np.put_along_axis(onehot, path[..., None], 1.0, axis=-1)
    np.testing.assert_allclose(marg, onehot, atol=1e-6)
    # Large T: every allowed path equally likely, so a free chain is uniform per layer.
    flat = S.viterbi_marginals(np.zeros((3, 4)), np.zeros((2, 4, 4)), 1e3)
    np.testing.assert_allclose(flat, 0.25, atol=1e-12)


def test_marginals_batched_and_infeasible():
    rng = np.random.default_rng(5)
    u, p = random_chain(rng, 4, 3, p_inf=0.0, P=3)
    u[1, 2] = np.inf  # platform 1: every choice of layer 2 forbidden
    marg, logz = S.viterbi_marginals(torch.from_numpy(u), torch.from_numpy(p), 0.3, return_log_partition=True)
    assert torch.isnan(marg[1]).all() and logz[1] == -math.inf
    for k in (0, 2):
        np.testing.assert_allclose(marg[k].numpy(), brute_marginals(u[k], p[k], 0.3)[0], atol=1e-10)


# --------------------------------------------------------------------------- budget


def brute_budget_threshold(u, c, r, budget):
    """Smallest gamma whose brute-force min-sum path meets the budget (60-step bisection)."""
    paths = list(all_paths(*u.shape))
    cost = np.array([path_cost(u, c, x) for x in paths])
    res = np.array([path_cost(np.zeros_like(u), r, x) for x in paths])

    def feasible(g):
        return res[np.argmin(cost + g * res)] <= budget

    if feasible(0.0):
        return 0.0, cost, res
    lo, hi = 0.0, 1.0
    while not feasible(hi):
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi, cost, res


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_matches_brute_force(backend):
    rng = np.random.default_rng(6)
    for trial in range(12):
        L, K = 2 + trial % 4, 2 + trial % 3
        u, c = random_chain(rng, L, K, p_inf=0.0)
        r = rng.uniform(0, 2, (L - 1, K, K))
        res_all = np.array([path_cost(np.zeros_like(u), r, x) for x in all_paths(L, K)])
        budget = res_all.min() + 0.3 * (res_all.max() - res_all.min())
        out = S.viterbi_budget(u, r, budget, max_iter=60, pairwise=c, backend=backend)
        g_star, cost, res = brute_budget_threshold(u, c, r, budget)
        assert out.resource <= budget
        assert out.cost == pytest.approx(path_cost(u, c, out.path), abs=1e-12)
        assert out.resource == pytest.approx(path_cost(np.zeros_like(u), r, out.path), abs=1e-12)
        assert out.gamma == pytest.approx(g_star, rel=1e-6, abs=1e-9)
        # Optimal for its multiplier, hence the cheapest path using at most its resource.
        assert out.cost + out.gamma * out.resource == pytest.approx((cost + out.gamma * res).min(), abs=1e-9)
        assert out.cost <= cost[res <= out.resource + 1e-12].min() + 1e-9
        # The constrained optimum can only be cheaper (duality gap), never dearer.
        assert cost[res <= budget].min() <= out.cost + 1e-12


def test_budget_batched_loose_budget_and_errors():
    rng = np.random.default_rng(7)
    u, _ = random_chain(rng, 5, 4, p_inf=0.0, P=3)
    r = rng.uniform(0, 1, (3, 4, 4, 4))
    out = S.viterbi_budget(torch.from_numpy(u), torch.from_numpy(r), torch.tensor([100.0, 1.0, 1.5]))
    assert out.gamma[0] == 0.0  # budget not binding: the unconstrained Viterbi path
    assert torch.equal(out.path[0], S.viterbi(torch.from_numpy(u[0]), torch.zeros(4, 4, 4, dtype=torch.float64))[0])
    for k in (1, 2):
        one = S.viterbi_budget(u[k], r[k], [1.0, 1.5][k - 1])
        assert (one.path == out.path[k].numpy()).all() and one.gamma == out.gamma[k].item()
    with pytest.raises(ValueError, match=r"budget 0\.01 is infeasible \(platform 1\): even the least-resource path uses"):
        S.viterbi_budget(u, r, [5.0, 0.01, 5.0])
    with pytest.raises(ValueError, match="resource_pairwise must be >= 0"):
        S.viterbi_budget(u, -r, 1.0)


@needs_cpp
def test_budget_fallback_equals_cpp():
    rng = np.random.default_rng(8)
    u, _ = random_chain(rng, 14, 14, p_inf=0.05, P=3)
    r = rng.uniform(0, 1, (3, 13, 14, 14))
    r[rng.random(r.shape) < 0.05] = np.inf
    a = S.viterbi_budget(u, r, 5.0, backend="cpp")
    b = S.viterbi_budget(u, r, 5.0, backend="torch")
    np.testing.assert_array_equal(a.path, b.path)
    np.testing.assert_allclose(a.gamma, b.gamma, rtol=1e-9)
    np.testing.assert_allclose(a.cost, b.cost, rtol=1e-12)


# --------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,reg", [(8, 8, 0.1), (12, 7, 0.05), (30, 45, 0.02)])
def test_sinkhorn_matches_pot_log(backend, n, m, reg):
    rng = np.random.default_rng(n * m)
    a, b, M = random_ot(rng, n, m)
    want = pot_log(a, b, M, reg)
    plan, info = S.sinkhorn(a, b, M, reg, max_iter=100000, tol=1e-13, return_info=True, backend=backend)
    assert isinstance(plan, np.ndarray) and plan.dtype == np.float64
    np.testing.assert_allclose(plan, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(plan, want, atol=1e-11, rtol=1e-6)
    assert info["converged"] and info["err"] <= 1e-13 and 0 < info["n_iter"] < 100000
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-12)
    np.testing.assert_allclose(np.exp(info["log_u"][:, None] - M / reg + info["log_v"][None]), plan, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_batched_matches_pot_and_one_by_one(backend):
    rng = np.random.default_rng(11)
    a, b, M = random_ot(rng, 9, 6, B=5)
    a[2, 0] = 0.0
    a[2] /= a[2].sum()
    at, bt, Mt = (torch.from_numpy(x) for x in (a, b, M))
    plan, info = S.sinkhorn(at, bt, Mt, 0.05, tol=1e-12, max_iter=100000, return_info=True, backend=backend)
    assert plan.shape == (5, 9, 6) and info["n_iter"].shape == (5,) and bool(info["converged"].all())
    for k in range(5):
        np.testing.assert_allclose(plan[k].numpy(), pot_log(a[k], b[k], M[k], 0.05), atol=1e-6)
        one = S.sinkhorn(at[k], bt[k], Mt[k], 0.05, tol=1e-12, max_iter=100000, backend=backend)
        torch.testing.assert_close(one, plan[k], rtol=0, atol=1e-15)
    assert (plan[2, 0] == 0).all()


@needs_cpp
@pytest.mark.parametrize("method", ["log", "standard"])
def test_sinkhorn_fallback_equals_cpp(method):
    rng = np.random.default_rng(12)
    a, b, M = (torch.from_numpy(x) for x in random_ot(rng, 20, 13, B=3))
    p1, i1 = S.sinkhorn(a, b, M, 0.03, method=method, tol=1e-12, max_iter=50000, return_info=True, backend="cpp")
    p2, i2 = S.sinkhorn(a, b, M, 0.03, method=method, tol=1e-12, max_iter=50000, return_info=True, backend="torch")
    torch.testing.assert_close(p1, p2, rtol=1e-8, atol=1e-13)
    assert (i1["n_iter"] - i2["n_iter"]).abs().max() <= 2  # same iteration; rounding near tol
    # With a fixed iteration count the iterates themselves agree.
    with pytest.warns(RuntimeWarning, match="did not converge in 40 iterations"):
        p1 = S.sinkhorn(a, b, M, 0.03, method=method, tol=0.0, max_iter=40, backend="cpp")
    with pytest.warns(RuntimeWarning, match="did not converge in 40 iterations"):
        p2 = S.sinkhorn(a, b, M, 0.03, method=method, tol=0.0, max_iter=40, backend="torch")
    torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-14)


def test_sinkhorn_float32_in_float32_out():
    rng = np.random.default_rng(13)
    a, b, M = (torch.tensor(x, dtype=torch.float32) for x in random_ot(rng, 10, 10))
    plan = S.sinkhorn(a, b, M, 0.1, tol=1e-6)
    assert plan.dtype == torch.float32
    # float32 masses agree only to ~1e-8, so the float64 reference stops at a looser tolerance.
    want = ot.sinkhorn(a.double().numpy(), b.double().numpy(), M.double().numpy(), 0.1,
                       method="sinkhorn_log", stopThr=1e-7)
    np.testing.assert_allclose(plan.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_small_reg_log_finite_where_standard_overflows(backend):
    rng = np.random.default_rng(14)
    a, b, M = random_ot(rng, 20, 25)
    M[0] = 0.8 + 0.2 * M[0]  # exp(-M / 1e-3) underflows to 0 on the whole first row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, early = S.sinkhorn(a, b, M, 1e-3, max_iter=10, return_info=True, backend=backend)
        plan, info = S.sinkhorn(a, b, M, 1e-3, max_iter=3000, tol=1e-8, return_info=True, backend=backend)
    # Small reg converges slowly, but the log iteration stays finite and keeps improving.
    assert np.isfinite(plan).all() and (plan >= 0).all() and info["err"] < min(1e-2, early["err"] / 10)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-10)
    with pytest.warns(RuntimeWarning, match=r"sinkhorn\(method='standard'\): numerical under/overflow at iteration 0: "
                                            r"reg=0\.001 is too small .* Use method='log'"):
        S.sinkhorn(a, b, M, 1e-3, method="standard", backend=backend)


@needs_cpp
def test_sinkhorn_reg_1e4_finite():
    rng = np.random.default_rng(15)
    a, b, M = random_ot(rng, 64, 64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        plan, info = S.sinkhorn(a, b, M, 1e-4, max_iter=300, return_info=True)
    assert np.isfinite(plan).all() and np.isfinite(info["err"]) and info["err"] < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_warns_with_reached_error(backend):
    rng = np.random.default_rng(16)
    a, b, M = random_ot(rng, 10, 12)
    with pytest.warns(RuntimeWarning, match=r"sinkhorn did not converge in 3 iterations: marginal error "
                                            r"\d\.\d{3}e-\d\d > tol 1\.0e-09; raise max_iter or reg") as rec:
        plan, info = S.sinkhorn(a, b, M, 0.01, max_iter=3, return_info=True, backend=backend)
    assert f"{info['err']:.3e}" in str(rec[0].message)
    assert info["n_iter"] == 3 and not info["converged"]
    # check_every=5 with max_iter=12: tested at 0, 5, 10 and at the end; n_iter is honest.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, info = S.sinkhorn(a, b, M, 0.01, max_iter=12, check_every=5, return_info=True, backend=backend)
    assert info["n_iter"] == 12 and info["check_every"] == 5


def test_sinkhorn_warm_start_round_trip():
    rng = np.random.default_rng(17)
    a, b, M = random_ot(rng, 15, 11)
    plan, info = S.sinkhorn(a, b, M, 0.05, tol=1e-12, max_iter=10000, return_info=True)
    again, info2 = S.sinkhorn(a, b, M, 0.05, tol=1e-11, warm_start=(info["log_u"], info["log_v"]), return_info=True)
    assert info2["n_iter"] <= 1
    np.testing.assert_allclose(again, plan, atol=1e-12)
    # POT's log_u/log_v use the same convention.
    _, log = ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", log=True, stopThr=1e-13, numItermax=100000)
    p3, info3 = S.sinkhorn(a, b, M, 0.05, tol=1e-11, warm_start=(log["log_u"], log["log_v"]), return_info=True)
    assert info3["n_iter"] <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_errors(backend):
    rng = np.random.default_rng(18)
    a, b, M = random_ot(rng, 4, 5)

    def call(a_=a, b_=b, M_=M, **kw):
        return S.sinkhorn(a_, b_, M_, kw.pop("reg", 0.1), backend=backend, **kw)

    bad = M.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="M contains NaN or inf"):
        call(M_=bad)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="M contains NaN or inf"):
        call(M_=bad)
    neg = a.copy()
    neg[0] = -0.1
    with pytest.raises(ValueError, match=r"a must be nonnegative, got -0\.1"):
        call(a_=neg)
    with pytest.raises(ValueError, match="b has zero total mass"):
        call(b_=np.zeros(5))
    with pytest.raises(ValueError, match=r"a and b must have the same total mass \(balanced OT\)"):
        call(b_=2 * b)
    with pytest.raises(ValueError, match=r"shape mismatch: M has shape \(4, 5\), so a must be \(4,\) and b \(5,\); "
                                         r"got a \(4,\) and b \(4,\)"):
        call(b_=a)
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        call(reg=0.0)
    with pytest.raises(ValueError, match="method must be 'log' or 'standard'"):
        call(method="greenkhorn")
    with pytest.raises(TypeError, match="M must be float32 or float64"):
        call(M_=np.ones((4, 5), dtype=np.int64))


@needs_cpp
def test_sinkhorn_op_checks_inputs_itself():
    a = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    M = torch.rand(1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="a must be nonnegative"):
        torch.ops.slimkern.sinkhorn(-a, a, M, 0.1, "log", 10, 1e-9, 1, None, None)
    with pytest.raises(ValueError, match=r"shape mismatch"):
        torch.ops.slimkern.sinkhorn(a, a, M[:, :2], 0.1, "log", 10, 1e-9, 1, None, None)
    with pytest.raises(ValueError, match="unary contains NaN"):
        torch.ops.slimkern.viterbi(torch.full((1, 2, 2), math.nan), torch.zeros(1, 1, 2, 2))


def test_viterbi_errors():
    u = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"pairwise must have shape \(2, 2, 2\) to match unary \(3, 2\), got \(2, 2, 3\)"):
        S.viterbi(u, np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="unary contains NaN"):
        S.viterbi(np.full((3, 2), np.nan), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"pairwise contains -inf"):
        S.viterbi(u, np.full((2, 2, 2), -np.inf))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        S.viterbi_marginals(u, np.zeros((2, 2, 2)), 0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        S.viterbi(u, np.zeros((2, 2, 2)), backend="cuda")


@needs_cpp
def test_ops_pass_opcheck():
    rng = np.random.default_rng(19)
    u, p = (torch.from_numpy(x) for x in random_chain(rng, 4, 3, p_inf=0.0, P=2))
    torch.library.opcheck(torch.ops.slimkern.viterbi, (u, p))
    torch.library.opcheck(torch.ops.slimkern.viterbi_marginals, (u, p, 0.5))
    torch.library.opcheck(torch.ops.slimkern.viterbi_budget, (u, None, p.abs(), torch.tensor([2.0, 2.0], dtype=torch.float64), 10))
    a, b, M = (torch.from_numpy(x) for x in random_ot(rng, 5, 4, B=2))
    torch.library.opcheck(torch.ops.slimkern.sinkhorn, (a, b, M, 0.1, "log", 50, 1e-9, 1, None, None))


@needs_cpp
def test_sinkhorn_releases_the_gil():
    rng = np.random.default_rng(20)
    a, b, M = (torch.from_numpy(x) for x in random_ot(rng, 256, 256))
    ticks, stop = [0], [False]

    def spin():
        while not stop[0]:
            ticks[0] += 1
            time.sleep(0)

    th = threading.Thread(target=spin)
    th.start()
    try:
        time.sleep(0.01)
        before = ticks[0]
        t0 = time.perf_counter()
        torch.ops.slimkern.sinkhorn(a[None], b[None], M[None], 0.01, "log", 5000, 0.0, 1, None, None)
        elapsed = time.perf_counter() - t0
        during = ticks[0] - before
    finally:
        stop[0] = True
        th.join()
    assert elapsed > 0.02  # long enough for the other thread to get scheduled
    assert during > 100, f"the Python thread advanced only {during} times while the solver ran"
