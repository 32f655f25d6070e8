"""slimkern.nas.platforms: CRP partitions against the Pitman-Yor EPPF and E[K_n]; Table 1 exactly."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from slimkern.nas import WEIGHT_SETTINGS, Platform, check_platforms, crp_partition, crp_weights, setting_weights


def _set_partitions(n):
    """All set partitions of range(n) as lists of blocks (blocks in order of their smallest element)."""
    if n == 0:
        yield []
        return
    for p in _set_partitions(n - 1):
        for i in range(len(p)):
            yield p[:i] + [p[i] + [n - 1]] + p[i + 1:]
        yield p + [[n - 1]]


def _rising(x, m):
    out = 1.0
    for i in range(m):
        out *= x + i
    return out


def _eppf(sizes, alpha, theta):
    """Pitman-Yor exchangeable partition probability of one set partition with these block sizes."""
    n, k = sum(sizes), len(sizes)
    num = math.prod(theta + i * alpha for i in range(1, k))
    return num / _rising(theta + 1, n - 1) * math.prod(_rising(1 - alpha, s - 1) for s in sizes)


def _expected_tables(n, alpha, theta):
    if alpha == 0:
        return sum(theta / (theta + i) for i in range(n))
    lr = (math.lgamma(theta + alpha + n) - math.lgamma(theta + alpha)) - (math.lgamma(theta + n) - math.lgamma(theta))
    return theta / alpha * (math.exp(lr) - 1)


@pytest.mark.parametrize("alpha,theta", [(0.3, 0.15), (0.0, 1.0), (-0.5, 1.5)])
def test_crp_partition_matches_eppf(alpha, theta):
    n, draws = 5, 20000
    # the sizes in order of opening equal the block sizes ordered by smallest element
    exact = Counter()
    for p in _set_partitions(n):
        exact[tuple(len(b) for b in p)] += _eppf([len(b) for b in p], alpha, theta)
    assert abs(sum(exact.values()) - 1) < 1e-12  # the EPPF is a distribution
    rng = np.random.default_rng(1)
    seen = Counter(tuple(crp_partition(n, alpha, theta, rng)) for _ in range(draws))
    assert set(seen) <= set(exact)
    for key, p in exact.items():
        freq = seen[key] / draws
        assert abs(freq - p) <= 4.5 * math.sqrt(p * (1 - p) / draws) + 1e-3, (key, freq, p)
    if alpha < 0:  # theta = -L alpha: at most L = 3 tables
        assert max(len(k) for k in seen) <= 3


@pytest.mark.parametrize("alpha,theta,n", [(0.3, 0.15, 150), (0.0, 2.0, 150), (0.6, 1.0, 100)])
def test_crp_expected_number_of_tables(alpha, theta, n):
    rng = np.random.default_rng(7)
    ks = np.array([len(crp_partition(n, alpha, theta, rng)) for _ in range(1500)])
    want = _expected_tables(n, alpha, theta)
    sem = ks.std(ddof=1) / math.sqrt(len(ks))
    assert abs(ks.mean() - want) < 4.5 * sem, (ks.mean(), want, sem)
    assert all(sum(crp_partition(n, alpha, theta, rng)) == n for _ in range(5))


def test_crp_partition_generators_and_errors():
    assert crp_partition(50, 0.3, 0.15, 3) == crp_partition(50, 0.3, 0.15, np.random.default_rng(3))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert crp_partition(50, 0.3, 0.15, g1) == crp_partition(50, 0.3, 0.15, g2)
    assert crp_partition(1, 0.3, 0.15, 0) == [1]
    with pytest.raises(ValueError, match="customers"):
        crp_partition(0, 0.3, 0.15)
    with pytest.raises(ValueError, match="alpha must be < 1"):
        crp_partition(5, 1.0, 0.15)
    with pytest.raises(ValueError, match="theta > -alpha"):
        crp_partition(5, 0.3, -0.3)
    with pytest.raises(ValueError, match="theta = -L"):
        crp_partition(5, -0.5, 1.2)
    with pytest.raises(TypeError, match="generator"):
        crp_partition(5, 0.3, 0.15, "seed")


def test_crp_weights_largest_share_is_golomb_dickman():
    # CRP(0, 1) is the cycle structure of a random permutation: the largest share -> 0.6243
    w = crp_weights(200, alpha=0.0, theta=1.0, customers=400, seed=0, draws=400)
    assert abs(sum(w) - 1) < 1e-12 and w == sorted(w)
    assert abs(w[-1] - 0.62433) < 0.04, w[-1]
    d = crp_weights(5, 0.3, 0.15, customers=2000, seed=1, order="descending")
    assert d == sorted(d, reverse=True) and abs(sum(d) - 1) < 1e-12 and len(d) == 5
    assert crp_weights(5, 0.3, 0.15, customers=2000, seed=1) == d[::-1]
    assert crp_weights(1, seed=2, customers=100) == [1.0]
    with pytest.raises(ValueError, match="order"):
        crp_weights(3, order="up")
    with pytest.raises(ValueError, match="num_platforms"):
        crp_weights(0)


def test_weight_settings_are_table_1_exactly():
    table1 = {"S": (0.005, 0.010, 0.045, 0.130, 0.310), "RS": (0.310, 0.130, 0.045, 0.010, 0.005),
              "U": (0.1,) * 5, "M": (0.025, 0.0625, 0.325, 0.0625, 0.025),
              "L": (0.005, 0.010, 0.020, 0.040, 0.425), "RL": (0.425, 0.040, 0.020, 0.010, 0.005)}
    assert list(WEIGHT_SETTINGS) == list(table1)
    for k, mid in table1.items():
        assert WEIGHT_SETTINGS[k] == (0.25, *mid, 0.25)
        assert abs(sum(WEIGHT_SETTINGS[k]) - 1) < 1e-12
    assert setting_weights("M")[3] == 0.325
    with pytest.raises(ValueError, match="unknown weight setting"):
        setting_weights("X")


def test_platform_validation():
    p = Platform("#1", 1e6, 0.5)
    assert p.cost == "macs"
    for kw, msg in [(dict(budget=0), "budget must be > 0"), (dict(weight=1.5), r"weight must be in \[0, 1\]"),
                    (dict(cost="flops"), "cost must be one of"), (dict(budget=float("nan")), "finite")]:
        with pytest.raises(ValueError, match=msg):
            Platform(**{"name": "a", "budget": 1.0, "weight": 0.5, **kw})
    with pytest.raises(ValueError, match="empty"):
        check_platforms([])
    with pytest.raises(ValueError, match="sum to 1"):
        check_platforms([Platform("a", 1, 0.5), Platform("b", 2, 0.4)])
    with pytest.raises(ValueError, match="unique"):
        check_platforms([Platform("a", 1, 0.5), Platform("a", 2, 0.5)])
    with pytest.raises(ValueError, match="same cost kind"):
        check_platforms([Platform("a", 1, 0.5), Platform("b", 2, 0.5, "params")])
    assert len(check_platforms([Platform("a", 1, 0.5), Platform("b", 2, 0.5)])) == 2
