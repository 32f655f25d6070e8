"""slimkern.nas latency: the NNLS fit recovers a known bilinear chain model; search with latency budgets."""
import itertools

import numpy as np
import pytest

from slimkern.nas import Platform, cost_model, fit_latency, measure_latency, search, search_space
from nas_nets import TinyChain


@pytest.fixture(scope="module")
def tiny():
    net = TinyChain().eval()
    sp = search_space(net, fractions=[0.25, 0.5, 0.75, 1.0], divisor=1)
    return net, sp, cost_model(net, sp, (1, 3, 8, 8))


def _truth(sp, paths, a, b, e, t0):
    out = []
    for p in paths:
        c = np.array([sp.choices[l][i] for l, i in enumerate(p)], dtype=float)
        out.append(t0 + a @ c[:-1] + b @ c[1:] + e @ (c[:-1] * c[1:]))
    return np.array(out)


def test_fit_recovers_a_known_model_and_drives_search(tiny):
    net, sp, cm = tiny
    rng = np.random.default_rng(0)
    a, b, e, t0 = rng.random(2) * 1e-5, rng.random(2) * 1e-5, rng.random(2) * 1e-6, 2e-4
    paths = [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(40)]
    model = fit_latency(sp, paths, _truth(sp, paths, a, b, e, t0), validation_fraction=0.25)
    assert model.validation_error < 1e-8
    allp = [list(p) for p in itertools.product(*[range(len(c)) for c in sp.choices])]
    np.testing.assert_allclose(model.predict(allp), _truth(sp, allp, a, b, e, t0), rtol=1e-8)
    T = model.table()
    for p in allp[::7]:
        assert sum(T[l, p[l], p[l + 1]] for l in range(2)) == pytest.approx(_truth(sp, [p], a, b, e, t0)[0], rel=1e-8)
    cm.set_latency(model)
    u = rng.random((3, 4))
    lat = model.predict(allp)
    budgets = [np.quantile(lat, q) for q in (0.1, 0.5, 1.0)]
    res = search(cm, u, [Platform(f"p{i}", float(x), 1 / 3, "latency") for i, x in enumerate(budgets)])
    for k, bud in enumerate(budgets):
        d = res.details[f"p{k}"]
        assert d.resource <= bud * (1 + 1e-12)
        # the Lagrangian certificate: cheapest among configurations at most as slow as the one found
        best = min(sum(u[l, i] for l, i in enumerate(p)) for p, t in zip(allp, lat) if t <= d.resource * (1 + 1e-12))
        assert d.predicted_loss == pytest.approx(best, abs=1e-12)


def test_measure_latency_and_errors(tiny):
    net, sp, cm = tiny
    rows = list(net.bn0.switches)
    t = measure_latency(net, sp, [sp.min_path(), sp.max_path()], (1, 3, 8, 8), repeats=2, warmup=1)
    assert t.shape == (2,) and (t > 0).all() and np.isfinite(t).all()
    assert net.bn0.switches == rows  # timed configurations leave no BN rows behind
    with pytest.raises(ValueError, match="too few timings"):
        fit_latency(sp, [sp.min_path()] * 3, [1e-3] * 3)
    with pytest.raises(ValueError, match="one timing per configuration"):
        fit_latency(sp, [sp.min_path()] * 30, [1e-3] * 29)
    with pytest.raises(ValueError, match="positive"):
        fit_latency(sp, [sp.min_path()] * 30, [0.0] * 30)
    with pytest.raises(ValueError, match="LatencyModel"):
        cm.set_latency("fast")
    fresh = cost_model(net, sp, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="fitted latency model"):
        fresh.table("latency")
