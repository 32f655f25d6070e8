"""Splitting a labelled data set across federated clients.

Three schemes, all deterministic for a seed and all assigning every sample to exactly
one client (the returned index arrays are disjoint and their union is ``range(n)``):

* ``iid`` -- a random permutation cut into near-equal parts.
* ``dirichlet`` -- label skew (Hsu, Qi & Brown 2019, "Measuring the effects of
  non-identical data distribution for federated visual classification"): for every
  class c, proportions ``p_c ~ Dir(alpha * 1_K)`` over the K clients, and the samples of
  class c are cut in those proportions. Small ``alpha`` (0.1) gives clients dominated by
  one or two classes; large ``alpha`` (100) approaches IID. Draws are repeated (with the
  same generator, so still deterministic) until every client holds at least
  ``min_size`` samples.
* ``shards`` / k classes per client (McMahan et al. 2017, "Communication-efficient
  learning of deep networks from decentralized data", pathological non-IID): client i
  holds exactly ``k`` distinct classes, assigned cyclically over a seeded permutation of
  the classes, and each class is split evenly among the clients that hold it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["partition", "iid", "dirichlet", "shards", "label_histogram"]


def _labels(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_clients(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool):
        raise TypeError(f"num_clients must be an int, got {type(num_clients).__name__}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients at least one of only {n} samples")


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Random near-equal split of ``range(n)`` (sizes differ by at most one)."""
    _check_clients(num_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels, num_clients: int, alpha: float = 0.5, seed: int = 0,
              min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Dirichlet(alpha) label-skew split (Hsu et al. 2019); see the module docstring."""
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if min_size * num_clients > len(y):
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {len(y)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(ch)) for ch in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise RuntimeError(
        f"dirichlet: no split with every client holding >= {min_size} samples after {max_tries} "
        f"draws (alpha={alpha}, {num_clients} clients, {len(y)} samples); raise alpha or lower min_size")


def shards(labels, num_clients: int, classes_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Exactly ``classes_per_client`` classes per client (McMahan et al. 2017 style)."""
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    k = int(classes_per_client)
    if not 1 <= k <= len(classes):
        raise ValueError(f"classes_per_client must be in [1, {len(classes)}], got {classes_per_client}")
    if num_clients * k < len(classes):
        raise ValueError(
            f"{num_clients} clients x {k} classes cannot cover all {len(classes)} classes; "
            "some samples would be assigned to nobody")
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(len(classes))]
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for i in range(num_clients):
        for j in range(k):
            holders[int(order[(i * k + j) % len(classes)])].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        owners = holders[int(c)]
        for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(chunk)
    out = [np.sort(np.concatenate(ch)) if ch else np.zeros(0, np.int64) for ch in parts]
    empty = [i for i, o in enumerate(out) if len(o) == 0]
    if empty:
        raise ValueError(f"shards: clients {empty} received no samples (too few samples per class)")
    return out


def partition(labels, num_clients: int, method: str = "iid", *, alpha: float = 0.5,
              classes_per_client: int = 2, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Index arrays, one per client, by ``method`` in {"iid", "dirichlet", "shards"}."""
    y = _labels(labels)
    if method == "iid":
        return iid(len(y), num_clients, seed)
    if method == "dirichlet":
        return dirichlet(y, num_clients, alpha, seed, min_size)
    if method in ("shards", "classes"):
        return shards(y, num_clients, classes_per_client, seed)
    raise ValueError(f"unknown partition method {method!r}; choose 'iid', 'dirichlet' or 'shards'")


def label_histogram(labels, parts: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """``[num_clients, num_classes]`` sample counts per client and class."""
    y = _labels(labels)
    c = int(num_classes if num_classes is not None else y.max() + 1)
    return np.stack([np.bincount(y[p], minlength=c) for p in parts])
