"""Width search on a residual net (tied widths): costs against slimkern.profile, min-sum
elimination against brute force and Viterbi, the Lagrangian certificate against brute force."""
import itertools

import numpy as np
import pytest

import slimkern as sk
from slimkern.nas import Platform, search_space
from slimkern.nas.graph_search import graph_cost_model, graph_search, min_sum
from slimkern.switch import Switch

SIZE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def resnet():
    net = sk.models.resnet20(width_mult=0.25).eval()
    sp = search_space(net, fractions=[0.5, 1.0], divisor=1, require_chain=False)
    cm = graph_cost_model(net, sp, SIZE)
    paths = [list(p) for p in itertools.product(*[range(len(c)) for c in sp.choices])]
    macs = np.array([cm.of_path(p) for p in paths], dtype=np.float64)
    return net, sp, cm, paths, macs


def test_costs_equal_profile_and_factor_sums(resnet):
    net, sp, cm, paths, _ = resnet
    assert not sp.is_chain and len(sp.groups) == 12  # 3 tied stage groups + 9 block-hidden groups
    rng = np.random.default_rng(0)
    for k in rng.choice(len(paths), 6, replace=False):
        ch = sp.channels(paths[k])
        prof = sk.profile(net, Switch.from_channels(ch), input_size=SIZE)
        assert cm.evaluate(ch, "macs") == prof.macs and cm.evaluate(ch, "params") == prof.params
        for kind in ("macs", "params"):
            tot = sum(float(t[tuple(paths[k][g] for g in s)]) if s else float(t) for s, t in cm.factors(kind))
            assert tot == pytest.approx(cm.evaluate(ch, kind), rel=1e-12)


def test_min_sum_matches_brute_force_and_viterbi(resnet):
    _, sp, cm, paths, _ = resnet
    rng = np.random.default_rng(1)
    sizes = [len(c) for c in sp.choices]
    u = rng.random((len(sizes), 2)) * 1e4
    fs = [((l,), u[l]) for l in range(len(sizes))] + [(s, 0.01 * t) for s, t in cm.factors("macs")]
    x, val = min_sum(sizes, fs)
    P = np.array(paths)
    allv = sum(t[tuple(P[:, g] for g in s)] if s else float(t) for s, t in fs)
    assert val == pytest.approx(allv.min(), rel=1e-12)
    assert float(allv[paths.index(x)]) == pytest.approx(val, rel=1e-12)
    # a chain: the same answer as slimkern.solvers.viterbi
    L, K = 6, 4
    un, pw = rng.random((L, K)), rng.random((L - 1, K, K))
    fs = [((l,), un[l]) for l in range(L)] + [((l, l + 1), pw[l]) for l in range(L - 1)]
    x, val = min_sum([K] * L, fs)
    vpath, vcost = sk.solvers.viterbi(un, pw)
    assert val == pytest.approx(float(vcost), rel=1e-9)
    assert x == [int(i) for i in np.asarray(vpath)]


def test_graph_search_lagrangian_certificate(resnet):
    _, sp, cm, paths, macs = resnet
    rng = np.random.default_rng(2)
    u = -np.log(np.array([list(c) for c in sp.choices], dtype=np.float64)) + 0.3 * rng.random((12, 2))
    ul = np.array([sum(u[l, i] for l, i in enumerate(p)) for p in paths])
    budgets = [float(np.quantile(macs, q)) for q in (0.05, 0.3, 0.6, 1.0)]
    res = graph_search(cm, u, [Platform(f"p{i}", b, 0.25) for i, b in enumerate(budgets)])
    for i, b in enumerate(budgets):
        d = res.details[f"p{i}"]
        assert d.resource <= b and d.resource == cm.evaluate(d.channels)
        best = ul[macs <= d.resource].min()  # cheapest of all configurations using at most its resource
        assert d.predicted_loss == pytest.approx(best, abs=1e-9)
        assert d.predicted_loss >= ul[macs <= b].min() - 1e-9  # never better than the true constrained optimum
    assert res.details["p3"].path == sp.max_path()  # an unconstraining budget takes the widest


def test_graph_search_errors(resnet):
    _, sp, cm, _, macs = resnet
    u = np.zeros((12, 2))
    with pytest.raises(ValueError, match="infeasible"):
        graph_search(cm, u, [Platform("tiny", float(macs.min()) * 0.5, 1.0)])
    with pytest.raises(ValueError, match="peak activation"):
        graph_search(cm, u, [Platform("p", 1e9, 1.0, "peak_activation")])
    with pytest.raises(ValueError, match="too entangled"):
        graph_search(cm, u, [Platform("p", float(np.median(macs)), 1.0)], max_factor=2)
    with pytest.raises(TypeError, match="GraphCostModel"):
        graph_search("net", u, [Platform("p", 1e9, 1.0)])
    with pytest.raises(ValueError, match="empty|platform"):
        graph_search(cm, u, [])


def test_search_dispatches_graph_cost_models(resnet):
    from slimkern.nas import search
    _, sp, cm, _, macs = resnet
    u = np.random.default_rng(3).random((12, 2))
    b = float(np.median(macs))
    assert search(cm, u, [Platform("p", b, 1.0)])["p"] == graph_search(cm, u, [Platform("p", b, 1.0)])["p"]
