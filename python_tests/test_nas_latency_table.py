"""AOWS's latency tables: exact recovery, the NNLS optimum of an independent solver (lsq_linear),
the KKT certificate of the penalised fit, biased sampling against brute force, search with it."""
import itertools

import numpy as np
import pytest
from scipy.optimize import lsq_linear

from slimkern.nas import Platform, cost_model, search, search_space
from slimkern.nas.latency_table import (LatencyTable, biased_paths, fit_latency_table, monotonicity_matrix,
                                        pair_counts, pair_design)
from nas_nets import TinyChain


@pytest.fixture(scope="module")
def tiny():
    net = TinyChain().eval()
    sp = search_space(net, fractions=[0.25, 0.5, 0.75, 1.0], divisor=1)
    return net, sp


def _all(sp):
    return [list(p) for p in itertools.product(*[range(len(c)) for c in sp.choices])]


def _monotone_tables(sp, rng):
    # cumulative sums of positive increments: nondecreasing in both channels
    return [np.cumsum(np.cumsum(rng.random((len(sp.choices[l]), len(sp.choices[l + 1]))), 0), 1) * 1e-4
            for l in range(sp.num_layers - 1)]


def _truth(tables, paths):
    return np.array([sum(t[p[l], p[l + 1]] for l, t in enumerate(tables)) for p in paths])


def test_design_and_counts_by_hand(tiny):
    _, sp = tiny
    M = pair_design(sp, [[0, 1, 2], [3, 3, 3]]).toarray()
    assert M.shape == (2, 32) and M.sum() == 4
    assert M[0, 0 * 4 + 1] == 1 and M[0, 16 + 1 * 4 + 2] == 1 and M[1, 15] == 1 and M[1, 31] == 1
    c = pair_counts(sp, [[0, 1, 2], [0, 1, 3]])
    assert c[0][0, 1] == 2 and c[0].sum() == 2 and c[1][1, 2] == 1 and c[1][1, 3] == 1
    K = monotonicity_matrix(sp).toarray()
    assert K.shape == (2 * 2 * 3 * 4, 32) and (K.sum(1) == 0).all()
    x = np.concatenate([t.reshape(-1) for t in _monotone_tables(sp, np.random.default_rng(0))])
    assert (K @ x <= 0).all() and (K @ -x > 0).any()  # monotone tables pass, reversed ones do not


@pytest.mark.parametrize("regularize", [0.0, 10.0])
def test_exact_recovery_of_a_monotone_table(tiny, regularize):
    _, sp = tiny
    tables = _monotone_tables(sp, np.random.default_rng(1))
    allp = _all(sp)
    model = fit_latency_table(sp, allp, _truth(tables, allp), regularize=regularize, validation_fraction=0.25)
    assert model.coverage == 1.0 and model.validation_error < 1e-6 and model.validation_nrmse < 1e-6
    np.testing.assert_allclose(model.predict(allp), _truth(tables, allp), rtol=1e-6)
    T = model.table()
    for p in allp[::5]:
        assert sum(T[l, p[l], p[l + 1]] for l in range(2)) == pytest.approx(_truth(tables, [p])[0], rel=1e-6)
    ch = sp.channels(allp[7])
    assert model.predict_channels(ch) == pytest.approx(_truth(tables, [allp[7]])[0], rel=1e-6)
    with pytest.raises(ValueError, match="not a choice"):
        model.predict_channels({**ch, sp.groups[0]: 3})


def test_unpenalised_fit_reaches_the_nnls_optimum_of_lsq_linear(tiny):
    _, sp = tiny
    rng = np.random.default_rng(2)
    paths = [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(50)]
    y = _truth(_monotone_tables(sp, rng), paths) * (1 + 0.2 * rng.standard_normal(50))
    model = fit_latency_table(sp, paths, np.abs(y), regularize=0.0, validation_fraction=0.0)
    M = pair_design(sp, paths).toarray()
    ref = lsq_linear(M, np.abs(y) * 1e3, bounds=(0, np.inf), tol=1e-14, max_iter=10000)
    mine = np.concatenate([p.reshape(-1) for p in model.pairs]) * 1e3
    assert np.sum((M @ mine - np.abs(y) * 1e3) ** 2) == pytest.approx(np.sum(ref.fun ** 2), rel=1e-7, abs=1e-12)


def test_penalised_fit_satisfies_kkt_and_the_penalty_orders_the_table(tiny):
    _, sp = tiny
    rng = np.random.default_rng(3)
    paths = [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(40)]
    y = np.abs(_truth(_monotone_tables(sp, rng), paths) + 3e-4 * rng.standard_normal(40))
    M, K = pair_design(sp, paths).toarray(), monotonicity_matrix(sp).toarray()
    viol = []
    for kappa in (0.0, 1.0, 1e4):
        model = fit_latency_table(sp, paths, y, regularize=kappa, validation_fraction=0.0)
        x = np.concatenate([p.reshape(-1) for p in model.pairs]) * 1e3
        g = 2 * M.T @ (M @ x - y * 1e3) + 2 * kappa * K.T @ np.maximum(K @ x, 0)
        tol = 1e-6 * np.abs(2 * M.T @ (y * 1e3)).max()  # relative to the gradient at x = 0
        assert (np.abs(g[x > 1e-9]) < tol).all() and (g[x <= 1e-9] > -tol).all()  # KKT for x >= 0
        viol.append(float(np.maximum(K @ x, 0).sum()))
    assert viol[0] > 0 and viol[2] < 1e-3 * viol[0] and viol[1] <= viol[0]


def test_biased_paths_cover_least_timed_entries_like_brute_force(tiny):
    _, sp = tiny
    picked = biased_paths(sp, 16, seed=0)
    assert all(c.min() >= 1 for c in pair_counts(sp, picked))  # 16 entries per pair, covered in 16 timings
    rng = np.random.default_rng(0)
    uniform = [[int(rng.integers(len(c))) for c in sp.choices] for _ in range(16)]
    assert min(int(c.min()) for c in pair_counts(sp, uniform)) == 0
    # each step maximises the number of least-timed entries a configuration covers (brute force)
    measured = uniform[:5]
    nxt = biased_paths(sp, 1, measured=measured, seed=4)[0]
    counts = pair_counts(sp, measured)
    m = min(int(c.min()) for c in counts)

    def gain(p):
        return sum(int(counts[l][p[l], p[l + 1]] == m) for l in range(2))
    assert gain(nxt) == max(gain(p) for p in _all(sp))
    with pytest.raises(ValueError, match="count"):
        biased_paths(sp, -1)


def test_latency_table_drives_the_search(tiny):
    net, sp = tiny
    rng = np.random.default_rng(5)
    tables = _monotone_tables(sp, rng)
    allp = _all(sp)
    cm = cost_model(net, sp, (1, 3, 8, 8))
    cm.set_latency(fit_latency_table(sp, allp, _truth(tables, allp), validation_fraction=0.0))
    assert isinstance(cm.latency, LatencyTable)
    u = rng.random((3, 4))
    lat = _truth(tables, allp)
    budget = float(np.quantile(lat, 0.4))
    d = search(cm, u, [Platform("p", budget, 1.0, "latency")]).details["p"]
    assert d.resource <= budget * (1 + 1e-9)
    best = min(sum(u[l, i] for l, i in enumerate(p)) for p, t in zip(allp, lat) if t <= d.resource * (1 + 1e-9))
    assert d.predicted_loss == pytest.approx(best, abs=1e-9)


def test_fit_errors(tiny):
    _, sp = tiny
    p = [sp.min_path(), sp.max_path()]
    with pytest.raises(ValueError, match="one timing per configuration"):
        fit_latency_table(sp, p, [1e-3])
    with pytest.raises(ValueError, match="finite positive"):
        fit_latency_table(sp, p, [1e-3, -1.0])
    with pytest.raises(ValueError, match="regularize"):
        fit_latency_table(sp, p, [1e-3, 2e-3], regularize=-1)
    with pytest.raises(ValueError, match="out of range"):
        fit_latency_table(sp, [[0, 0, 9], [0, 0, 0]], [1e-3, 2e-3])
    with pytest.raises(ValueError, match="length 3"):
        pair_design(sp, [[0, 0]])


def test_latency_experiment_options_are_checked():
    from slimkern.nas.latency_experiment import run_latency_experiment
    with pytest.raises(ValueError, match="unknown latency option"):
        run_latency_experiment({"timngs": 5})
    with pytest.raises(ValueError, match="timings"):
        run_latency_experiment({"timings": 0})
    with pytest.raises(ValueError, match="mobilenet_v1"):
        run_latency_experiment({"model": "resnet20"})


@pytest.mark.slow
def test_latency_experiment_run_folder(tmp_path):
    from slimkern.nas.latency_experiment import run_latency_experiment
    r = run_latency_experiment({"timings": 45, "validation": 4, "repeats": 1, "timing_warmup": 0, "regularize": [0.0],
                                "image_size": 8, "out": str(tmp_path)})
    assert [(f["train"], f["model"]) for f in r["fits"]] == [
        (t, m) for t in ("biased", "uniform") for m in ("table kappa=0", "bilinear", "a + b MACs")]
    assert r["fits"][0]["coverage"] > r["fits"][3]["coverage"]  # biased sampling covers more table entries
    assert {"mean_relative_difference", "nrmse", "spearman"} <= set(r["noise_floor"])
    assert len(r["searches"]) == 2 * 3
    for name in ("report.json", "samples.csv", "summary.md", "latency.png"):
        assert (tmp_path / name).exists()
    assert len((tmp_path / "samples.csv").read_text().strip().splitlines()) == 1 + 2 * 45 + 2 * 4
