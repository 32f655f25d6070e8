import numpy as np
import pytest

from slimkern.fl import partition, label_histogram


def _labels(n=600, c=10, seed=1):
    return np.random.default_rng(seed).integers(0, c, size=n)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_every_sample_exactly_once_and_deterministic(method):
    y = _labels()
    parts = partition(y, 20, method, alpha=0.3, classes_per_client=2, seed=7)
    allidx = np.concatenate(parts)
    assert len(parts) == 20
    assert len(allidx) == len(y)
    assert np.array_equal(np.sort(allidx), np.arange(len(y)))
    assert all(len(p) >= 1 for p in parts)
    again = partition(y, 20, method, alpha=0.3, classes_per_client=2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(y, 20, method, alpha=0.3, classes_per_client=2, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_balanced():
    parts = partition(_labels(603), 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_skew():
    y = _labels(3000)

    def skew(alpha):
        h = label_histogram(y, partition(y, 20, "dirichlet", alpha=alpha, seed=3), 10)
        return float((h.max(1) / h.sum(1)).mean())

    low, high = skew(0.1), skew(100.0)
    assert low > 0.5 > high  # alpha=0.1: a dominant class; alpha=100: near uniform (~0.1-0.2)
    assert high < 0.25


def test_dirichlet_min_size():
    y = _labels(400)
    parts = partition(y, 30, "dirichlet", alpha=0.1, seed=0, min_size=5)
    assert min(len(p) for p in parts) >= 5


def test_shards_exact_classes_per_client():
    y = _labels(1000)
    parts = partition(y, 15, "shards", classes_per_client=3, seed=2)
    h = label_histogram(y, parts, 10)
    assert ((h > 0).sum(1) == 3).all()


def test_bad_arguments():
    y = _labels(50)
    with pytest.raises(ValueError, match="unknown partition method"):
        partition(y, 3, "random")
    with pytest.raises(ValueError, match="cannot cover all 10 classes"):
        partition(y, 2, "shards", classes_per_client=2)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        partition(y, 3, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        partition(y, 0)
    with pytest.raises(ValueError, match="at least one of only 50 samples"):
        partition(y, 51)
    with pytest.raises(TypeError, match="labels must be integers"):
        partition(np.zeros(10) + 0.5, 2)
