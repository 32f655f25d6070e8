"""Solver benchmarks: slimkern C++ vs the slimkern torch fallback vs POT vs a NumPy reference.

    python -m pytest benchmarks/bench_solvers.py -q --benchmark-json=benchmarks/results/solvers.json
    python benchmarks/bench_solvers.py benchmarks/results/solvers.json   # ratios vs the targets

Targets (issue 5): Sinkhorn log n=m=256, reg=0.01, 1000 iterations >= 20x POT's
sinkhorn_log and no slower than POT's standard sinkhorn; 64 problems of n=64 in one call
>= 10x a Python loop over POT; viterbi_budget 7 platforms x 14 layers x 14 choices x 30
bisection steps < 2 ms and >= 50x a NumPy implementation of the same recurrences.
Every provider runs exactly the same iterations (tol=0 / stopThr=0: no early stop).
"""
import json
import os
import sys
import warnings

import numpy as np
import pytest

try:
    import torch

    import slimkern as sk
    from slimkern._library import has_op
except ImportError:  # summarize() only needs the JSON
    sk = None

ot = pytest.importorskip("ot") if __name__ != "__main__" else None

N, REG, ITERS = 256, 0.01, 1000
BATCH, NB = 64, 64
PLATFORMS, LAYERS, CHOICES, BISECT = 7, 14, 14, 30
SLOW = dict(rounds=3, iterations=1, warmup_rounds=0)
ONCE = dict(rounds=1, iterations=1, warmup_rounds=0)  # the pure-torch fallbacks take seconds to minutes


def _quiet(fn):
    def run(*args, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol=0 makes every provider report non-convergence
            return fn(*args, **kw)

    return run


def _ot_problem(rng, n, B=None):
    lead = () if B is None else (B,)
    a = rng.random(lead + (n,)) + 0.5
    b = rng.random(lead + (n,)) + 0.5
    a /= a.sum(-1, keepdims=True)
    b /= b.sum(-1, keepdims=True)
    return a, b, rng.random(lead + (n, n))


@pytest.fixture(scope="module")
def single():
    return _ot_problem(np.random.default_rng(0), N)


@pytest.fixture(scope="module")
def batch():
    return _ot_problem(np.random.default_rng(1), NB, BATCH)


needs_cpp = pytest.mark.skipif(sk is None or not has_op("sinkhorn"), reason="slimkern._C solvers not built")

# --------------------------------------------------------------------------- Sinkhorn n=256


@needs_cpp
@pytest.mark.benchmark(group="sinkhorn_256")
@pytest.mark.parametrize("method", ["log", "standard"])
def test_sinkhorn256_slimkern_cpp(benchmark, single, method):
    a, b, M = (torch.from_numpy(x) for x in single)
    run = _quiet(sk.solvers.sinkhorn)
    plan = benchmark(run, a, b, M, REG, method=method, max_iter=ITERS, tol=0.0, backend="cpp")
    assert torch.isfinite(plan).all()


@pytest.mark.benchmark(group="sinkhorn_256")
def test_sinkhorn256_slimkern_torch_fallback(benchmark, single):
    a, b, M = (torch.from_numpy(x) for x in single)
    run = _quiet(sk.solvers.sinkhorn)
    benchmark.pedantic(run, (a, b, M, REG), dict(max_iter=ITERS, tol=0.0, backend="torch"), **ONCE)


@pytest.mark.benchmark(group="sinkhorn_256")
def test_sinkhorn256_pot_log(benchmark, single):
    a, b, M = single
    benchmark.pedantic(_quiet(ot.sinkhorn), (a, b, M, REG),
                       dict(method="sinkhorn_log", numItermax=ITERS, stopThr=0.0), **SLOW)


@pytest.mark.benchmark(group="sinkhorn_256")
def test_sinkhorn256_pot_standard(benchmark, single):
    a, b, M = single
    benchmark(_quiet(ot.sinkhorn), a, b, M, REG, method="sinkhorn", numItermax=ITERS, stopThr=0.0)


# --------------------------------------------------------------------------- Sinkhorn batched


@needs_cpp
@pytest.mark.benchmark(group="sinkhorn_batch64")
def test_batch64_slimkern_cpp(benchmark, batch):
    a, b, M = (torch.from_numpy(x) for x in batch)
    benchmark(_quiet(sk.solvers.sinkhorn), a, b, M, REG, max_iter=ITERS, tol=0.0, backend="cpp")


@pytest.mark.benchmark(group="sinkhorn_batch64")
def test_batch64_slimkern_torch_fallback(benchmark, batch):
    a, b, M = (torch.from_numpy(x) for x in batch)
    benchmark.pedantic(_quiet(sk.solvers.sinkhorn), (a, b, M, REG), dict(max_iter=ITERS, tol=0.0, backend="torch"),
                       **ONCE)


@pytest.mark.benchmark(group="sinkhorn_batch64")
@pytest.mark.parametrize("method", ["sinkhorn_log", "sinkhorn"])
def test_batch64_pot_loop(benchmark, batch, method):
    a, b, M = batch

    @_quiet
    def loop():
        return [ot.sinkhorn(a[k], b[k], M[k], REG, method=method, numItermax=ITERS, stopThr=0.0) for k in range(BATCH)]

    benchmark.pedantic(loop, rounds=1 if method == "sinkhorn_log" else 3, iterations=1)


# --------------------------------------------------------------------------- viterbi_budget


def _budget_problem():
    rng = np.random.default_rng(2)
    unary = rng.random((PLATFORMS, LAYERS, CHOICES))
    # Latency-like resource growing with both widths, a different scale per platform.
    w = np.linspace(0.2, 1.0, CHOICES)
    base = np.outer(w, w)[None, None] * rng.uniform(0.5, 2.0, (PLATFORMS, 1, 1, 1))
    resource = base * rng.uniform(0.9, 1.1, (PLATFORMS, LAYERS - 1, CHOICES, CHOICES))
    budget = 0.2 * resource.max(axis=(2, 3)).sum(1)  # binding on every platform
    return unary, resource, budget


def numpy_viterbi(u, w):
    """Min-sum DP + backtrack (the recurrences of core/viterbi.cpp, vectorised per layer)."""
    L = u.shape[0]
    d = u[0]
    back = np.empty((L - 1, u.shape[1]), dtype=np.int64)
    for l in range(1, L):
        tot = d[:, None] + w[l - 1]
        back[l - 1] = tot.argmin(0)
        d = tot.min(0) + u[l]
    path = np.empty(L, dtype=np.int64)
    path[-1] = d.argmin()
    for l in range(L - 1, 0, -1):
        path[l - 1] = back[l - 1, path[l]]
    return path


def numpy_budget(unary, resource, budget, max_iter=BISECT):
    """The same bracketing + bisection as the C++ core, one platform at a time, in NumPy."""
    out = []
    for u, r, bud in zip(unary, resource, budget):
        L = u.shape[0]
        idx = np.arange(L - 1)

        def used(p):
            return r[idx, p[:-1], p[1:]].sum()

        p = numpy_viterbi(u, np.zeros_like(r))
        r0 = used(p)
        if r0 <= bud:
            out.append((p, 0.0))
            continue
        least = numpy_viterbi(np.zeros_like(u), r)
        lo, hi = 0.0, (np.ptp(u) * L) / max(r0 - used(least), 1e-300)
        while True:
            best = numpy_viterbi(u, hi * r)
            if used(best) <= bud:
                break
            lo, hi = hi, 2 * hi
        for _ in range(max_iter):
            mid = lo + 0.5 * (hi - lo)
            p = numpy_viterbi(u, mid * r)
            if used(p) <= bud:
                hi, best = mid, p
            else:
                lo = mid
        out.append((best, hi))
    return out


@needs_cpp
@pytest.mark.benchmark(group="viterbi_budget")
def test_budget_slimkern_cpp(benchmark):
    u, r, b = (torch.from_numpy(x) for x in _budget_problem())
    res = benchmark(sk.solvers.viterbi_budget, u, r, b, BISECT, backend="cpp")
    want = numpy_budget(*_budget_problem())
    assert [p.tolist() for p, _ in want] == res.path.tolist()
    np.testing.assert_allclose([g for _, g in want], res.gamma.numpy(), rtol=1e-12)


@pytest.mark.benchmark(group="viterbi_budget")
def test_budget_slimkern_torch_fallback(benchmark):
    u, r, b = (torch.from_numpy(x) for x in _budget_problem())
    benchmark.pedantic(sk.solvers.viterbi_budget, (u, r, b, BISECT), dict(backend="torch"), **SLOW)


@pytest.mark.benchmark(group="viterbi_budget")
def test_budget_numpy_reference(benchmark):
    benchmark.pedantic(numpy_budget, _budget_problem(), rounds=5, iterations=1)


# --------------------------------------------------------------------------- summary


def summarize(path):
    """Prints each target's ratio of medians from a saved pytest-benchmark JSON."""
    with open(path) as fh:
        data = json.load(fh)
    med = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}

    def ratio(slow, fast):
        return med[slow] / med[fast] if slow in med and fast in med else float("nan")

    cpp = "test_sinkhorn256_slimkern_cpp[log]"
    rows = [
        ("sinkhorn 256 log: POT sinkhorn_log / slimkern (>= 20)", ratio("test_sinkhorn256_pot_log", cpp)),
        ("sinkhorn 256 log: POT standard / slimkern (>= 1)", ratio("test_sinkhorn256_pot_standard", cpp)),
        ("sinkhorn 256 log: slimkern torch fallback / slimkern", ratio("test_sinkhorn256_slimkern_torch_fallback", cpp)),
        ("batch 64x64: POT sinkhorn_log loop / slimkern (>= 10)", ratio("test_batch64_pot_loop[sinkhorn_log]", "test_batch64_slimkern_cpp")),
        ("batch 64x64: POT standard loop / slimkern", ratio("test_batch64_pot_loop[sinkhorn]", "test_batch64_slimkern_cpp")),
        ("viterbi_budget: NumPy / slimkern (>= 50)", ratio("test_budget_numpy_reference", "test_budget_slimkern_cpp")),
        ("viterbi_budget: torch fallback / slimkern", ratio("test_budget_slimkern_torch_fallback", "test_budget_slimkern_cpp")),
    ]
    for name in sorted(med):
        print(f"  {name:48s} median {med[name] * 1e3:10.3f} ms")
    for label, value in rows:
        print(f"{label:58s} {value:8.1f}x")
    if "test_budget_slimkern_cpp" in med:
        print(f"{'viterbi_budget slimkern median (< 2 ms)':58s} {med['test_budget_slimkern_cpp'] * 1e3:8.3f} ms")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the solver targets' ratios from a saved pytest-benchmark JSON "
                                             "(run the benchmarks with pytest, see the module docstring)")
    ap.add_argument("json", nargs="?", default="benchmarks/results/solvers.json")
    path = ap.parse_args().json
    if not os.path.exists(path):
        ap.error(f"no such file: {path}")
    summarize(path)
