"""slimkern.nas.search against brute-force enumeration; the AOWS sampler and schedule."""
import itertools
import math
import time

import numpy as np
import pytest
import torch

import slimkern as sk
from slimkern.nas import (AOWSSampler, Platform, UnaryStats, aows_schedule, cost_model, schedule_temperature,
                          search, search_space)
from nas_nets import TinyChain


@pytest.fixture(scope="module")
def tiny():
    net = TinyChain().eval()
    sp = search_space(net, fractions=[0.25, 0.5, 0.75, 1.0], divisor=1)
    return net, sp, cost_model(net, sp, (1, 3, 8, 8))


def _all(sp, cm, u, kind):
    out = []
    for path in itertools.product(*[range(len(c)) for c in sp.choices]):
        out.append((sum(u[l, i] for l, i in enumerate(path)), cm.of_path(path, kind), list(path)))
    return out


def _plats(budgets, kind="macs"):
    return [Platform(f"p{i}", float(b), 1 / len(budgets), kind) for i, b in enumerate(budgets)]


def test_search_is_optimal_at_lagrangian_budgets(tiny):
    net, sp, cm = tiny
    rng = np.random.default_rng(0)
    for trial in range(3):
        u = rng.random((3, 4)) * 10
        allc = _all(sp, cm, u, "macs")
        # budgets at the resource of brute-force minimisers of u + g r: the exact constrained optimum is there
        budgets = sorted({min(allc, key=lambda t: t[0] + g * t[1])[1] for g in (0, 1e-5, 1e-4, 3e-4, 1e-3, 1)})
        res = search(cm, u, _plats(budgets))
        for k, b in enumerate(budgets):
            d = res.details[f"p{k}"]
            best = min(c for c, r, _ in allc if r <= b)
            assert d.resource <= b and d.resource == cm.of_path(d.path)
            assert d.predicted_loss == pytest.approx(best, abs=1e-9), (trial, b)


def test_search_certificate_at_any_budget_and_gap(tiny):
    net, sp, cm = tiny
    rng = np.random.default_rng(1)
    u = rng.random((3, 4)) * 10
    allc = _all(sp, cm, u, "macs")
    lo, hi = cm.of_path(sp.min_path()), cm.of_path(sp.max_path())
    budgets = np.linspace(lo, hi * 1.1, 9)
    res = search(cm, u, _plats(budgets))
    for k, b in enumerate(budgets):
        d = res.details[f"p{k}"]
        assert d.resource <= b
        # the Lagrangian path is the cheapest of all configurations using at most its own resource
        assert d.predicted_loss == pytest.approx(min(c for c, r, _ in allc if r <= d.resource), abs=1e-9)
        assert d.predicted_loss >= min(c for c, r, _ in allc if r <= b) - 1e-9  # never beats the optimum
        assert 0 < d.budget_percent <= 100
    assert res[f"p{len(budgets) - 1}"] == sp.switch(min(allc)[2])  # budget above all: the unconstrained min


def test_peak_activation_search_is_exact(tiny):
    net, sp, cm = tiny
    u = np.random.default_rng(2).random((3, 4))
    allc = _all(sp, cm, u, "peak_activation")
    peaks = sorted({r for _, r, _ in allc})
    budgets = [peaks[0], peaks[len(peaks) // 2], peaks[-1] + 0.5]
    res = search(cm, u, _plats(budgets, "peak_activation"))
    for k, b in enumerate(budgets):
        d = res.details[f"p{k}"]
        assert d.resource <= b
        assert d.predicted_loss == pytest.approx(min(c for c, r, _ in allc if r <= b), abs=1e-12)


def test_search_errors(tiny):
    net, sp, cm = tiny
    u = np.zeros((3, 4))
    least = cm.of_path(sp.min_path())
    with pytest.raises(ValueError, match=r"platform 'small'.*infeasible.*narrowest"):
        search(cm, u, [Platform("small", least - 1, 0.5), Platform("ok", 1e9, 0.5)])
    with pytest.raises(ValueError, match="empty"):
        search(cm, u, [])
    with pytest.raises(ValueError, match="sum to 1"):
        search(cm, u, [Platform("a", 1e9, 0.5)], require_weights=True)
    with pytest.raises(ValueError, match="shape"):
        search(cm, np.zeros((2, 4)), _plats([1e9]))
    with pytest.raises(ValueError, match="finite"):
        search(cm, np.full((3, 4), np.nan), _plats([1e9]))
    with pytest.raises(ValueError, match="budgets are in 'macs'"):
        search(cm, u, _plats([1e9]), cost="params")
    with pytest.raises(ValueError, match="input_size"):
        search(net, UnaryStats(sp), _plats([1e9]))


def test_search_from_net_and_stats_runs_and_seven_platforms_are_fast(tiny):
    net, sp, cm = tiny
    st = UnaryStats(sp)
    st.update([3, 3, 3], [1.0], [1.0])
    res = search(net, st, _plats([9000, 30000]), input_size=(1, 3, 8, 8))
    net.train()
    with sk.use_switch(net, res["p0"]), torch.no_grad():  # the found switch runs (batch statistics)
        assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    net.eval()
    big = sk.models.mobilenet_v1(width_mult=0.25, max_width=1.5)
    bsp = search_space(big, divisor=2)
    bcm = cost_model(big, bsp, (1, 3, 32, 32))
    full = bcm.evaluate(bsp.uniform_channels(1.0))
    plats = [Platform(f"#{i + 1}", f * full, 1 / 7) for i, f in enumerate([.25, .375, .5, .625, .75, .875, 1.0])]
    u = np.random.default_rng(3).random((bsp.num_layers, bsp.max_choices))
    t0 = time.perf_counter()
    res = search(bcm, u, plats)
    assert time.perf_counter() - t0 < 1.0
    for d in res.details.values():
        assert d.resource <= d.platform.budget and d.budget_percent > 80


def test_aows_schedule_by_hand():
    pts = aows_schedule(20, warmup=5)
    assert pts == [(0.0, 1.0), (5.0, 1.0), (6.0, 1e-2), (10.0, 1e-3), (20.0, 5e-4)]
    assert schedule_temperature(pts, 3.0) == 1.0
    assert schedule_temperature(pts, 5.5) == pytest.approx(0.1)                 # halfway 1 -> 1e-2 in log
    assert schedule_temperature(pts, 8.0) == pytest.approx(10 ** -2.5)          # halfway 1e-2 -> 1e-3
    assert schedule_temperature(pts, 15.0) == pytest.approx(10 ** ((-3 + math.log10(5e-4)) / 2))
    assert schedule_temperature(pts, 30.0) == 5e-4
    assert aows_schedule(4, warmup=1) == [(0.0, 1.0), (1.0, 1.0), (2.0, 1e-2), (4.0, 5e-4)]
    with pytest.raises(ValueError, match="increasing"):
        schedule_temperature([(0, 1.0), (0, 0.5)], 1.0)
    with pytest.raises(ValueError, match="warmup"):
        aows_schedule(5, warmup=5)


def test_aows_sampler(tiny):
    net, sp, cm = tiny
    st = UnaryStats(sp, attribution="loss")
    rng = np.random.default_rng(4)
    for _ in range(30):
        path = [int(rng.integers(len(c))) for c in sp.choices]
        st.update(path, [float(rng.random()) * 3])
    plats = [Platform("a", 8000, 0.8), Platform("b", 20000, 0.2)]
    s = AOWSSampler(cm, st, plats, epochs=10, warmup=2, generator=torch.Generator().manual_seed(0))
    ks = [s.sample(0.5)[0] for _ in range(1000)]  # warm-up: platform ~ weights, layers uniform
    assert abs(np.mean(np.array(ks) == 0) - 0.8) < 0.05 and s.last_temperature is None
    # at a tiny temperature the marginals are the search's Viterbi path
    res = search(cm, st, plats)
    for k, name in enumerate(("a", "b")):
        m = s.probabilities(k, 1e-4)
        assert [int(i) for i in m.argmax(1)] == res.details[name].path
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-9)
    k, path = s.sample(9.9)
    assert s.last_temperature == pytest.approx(schedule_temperature(s.schedule, 9.9))
    assert len(path) == 3
    ows = AOWSSampler(cm, st, plats, epochs=10, warmup=2, adaptive=False)
    ows.sample(9.0)
    assert ows.last_temperature is None
