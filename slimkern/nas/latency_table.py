"""AOWS's latency model: one free latency per (layer pair, input choice, output choice), fitted
to timings of whole configurations with a monotonicity penalty; biased sampling of the
configurations to time.

Berman et al., "AOWS", CVPR 2020, Sec. 3.3 and its ``latency.py``: a configuration's latency is
``T(c) = sum_l T_l[c_l, c_{l+1}]``, a sum of table entries, one per layer pair. With the timings
``y`` of ``n`` configurations and ``M`` the ``n x V`` 0/1 matrix of the entries each one uses,

.. math:: \\min_{x \\ge 0} \\; \\|M x - y\\|^2 + \\kappa \\, \\|\\max(K x, 0)\\|^2

(AOWS's Eq. 7, written there as ``sum_squares(t)`` with ``t >= 0``, ``K x <= t``), where every
row of ``K`` is ``x[l, i, j] - x[l, i', j']`` for two neighbouring entries of one table, the
second with one more input (or output) choice: a narrower layer should not be slower. Units
are AOWS's: milliseconds, so ``kappa`` is in its units. The problem is convex and smooth
(the squared hinge is C^1); we solve it with L-BFGS-B under the bounds ``x >= 0`` (AOWS uses
cvxpy/SCS) and verify the KKT conditions in the tests.

Table entries no timed configuration used are fixed only by the penalty (from the start point
0), which is why AOWS times *biased* configurations: :func:`biased_paths` picks, by Viterbi,
the configuration covering the most entries that have the fewest timings so far (its
``gen_configuration_biased``), ties broken at random.

Compared with the bilinear fit (:func:`slimkern.nas.fit_latency`: four numbers per pair),
a table can express anything a layer pair does (tile-size steps, cache effects) but needs on
the order of ``sum_l K_l K_{l+1}`` timings.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from slimkern.nas.latency import LatencyModel
from slimkern.nas.space import SearchSpace

__all__ = ["LatencyTable", "biased_paths", "fit_latency_table", "monotonicity_matrix", "pair_counts",
           "pair_design"]


def _offsets(space: SearchSpace) -> list[int]:
    sizes = [len(space.choices[l]) * len(space.choices[l + 1]) for l in range(space.num_layers - 1)]
    return [int(x) for x in np.concatenate([[0], np.cumsum(sizes)])]


def _check_paths(space: SearchSpace, paths) -> np.ndarray:
    P = np.asarray([list(p) for p in paths], dtype=np.int64)
    if P.ndim != 2 or P.shape[1] != space.num_layers:
        raise ValueError(f"paths must be choice-index lists of length {space.num_layers}, got shape {P.shape}")
    hi = np.array([len(c) for c in space.choices])
    if (P < 0).any() or (P >= hi).any():
        raise ValueError("a path has a choice index out of range of its group's choices")
    return P


def pair_design(space: SearchSpace, paths):
    """The ``[n, V]`` sparse 0/1 matrix ``M``: ``M[s, v] = 1`` when configuration ``s`` uses table
    entry ``v``; entry ``(l, i, j)`` is column ``offset_l + i * K_{l+1} + j``."""
    from scipy.sparse import csr_matrix

    P = _check_paths(space, paths)
    off = _offsets(space)
    n, L = P.shape
    cols = np.stack([off[l] + P[:, l] * len(space.choices[l + 1]) + P[:, l + 1] for l in range(L - 1)], 1)
    return csr_matrix((np.ones(n * (L - 1)), (np.repeat(np.arange(n), L - 1), cols.reshape(-1))),
                      shape=(n, off[-1]))


def pair_counts(space: SearchSpace, paths) -> list[np.ndarray]:
    """How many of ``paths`` use each table entry: one ``[K_l, K_{l+1}]`` int array per pair."""
    off = _offsets(space)
    c = np.asarray(pair_design(space, paths).sum(0)).reshape(-1).astype(np.int64) if len(paths) else \
        np.zeros(off[-1], np.int64)
    return [c[off[l]:off[l + 1]].reshape(len(space.choices[l]), len(space.choices[l + 1]))
            for l in range(space.num_layers - 1)]


def monotonicity_matrix(space: SearchSpace):
    """AOWS's ``K``: one row ``e_(l,i,j) - e_(l,i+1,j)`` and ``e_(l,i,j) - e_(l,i,j+1)`` per pair of
    neighbouring entries (choices are sorted, so ``K x <= 0`` means monotone in both channels)."""
    from scipy.sparse import csr_matrix

    off = _offsets(space)
    rows, cols, vals = [], [], []
    r = 0
    for l in range(space.num_layers - 1):
        ki, kj = len(space.choices[l]), len(space.choices[l + 1])
        idx = off[l] + np.arange(ki * kj).reshape(ki, kj)
        for a, b in ((idx[:-1, :], idx[1:, :]), (idx[:, :-1], idx[:, 1:])):
            a, b = a.reshape(-1), b.reshape(-1)
            m = a.size
            rows += [np.arange(r, r + m)] * 2
            cols += [a, b]
            vals += [np.ones(m), -np.ones(m)]
            r += m
    if r == 0:
        return csr_matrix((0, off[-1]))
    return csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, off[-1]))


def biased_paths(space: SearchSpace, count: int, measured=(), seed: int = 0) -> list[list[int]]:
    """``count`` configurations to time next, each covering (by Viterbi) the most table entries
    whose timing count equals the current minimum (AOWS ``gen_configuration_biased``); counts
    include ``measured`` and the configurations already picked. Ties between equally good
    configurations are broken by a noise below 1/(L+1) per entry, drawn with ``seed``."""
    from slimkern.solvers import viterbi

    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    rng = np.random.default_rng(seed)
    counts = pair_counts(space, list(measured))
    L, K = space.num_layers, space.max_choices
    out = []
    for _ in range(int(count)):
        m = min(int(c.min()) for c in counts)
        pw = np.full((L - 1, K, K), np.inf)
        for l, c in enumerate(counts):
            # the reward of an entry is 1 when it is among the least timed; the noise (sum < 1) only breaks ties
            pw[l, :c.shape[0], :c.shape[1]] = -(c == m).astype(np.float64) - rng.random(c.shape) / (L + 1)
        unary = np.zeros((L, K))
        for l, ch in enumerate(space.choices):
            unary[l, len(ch):] = np.inf
        path, _ = viterbi(unary, pw)
        path = [int(i) for i in np.asarray(path)]
        out.append(path)
        for l in range(L - 1):
            counts[l][path[l], path[l + 1]] += 1
    return out


@dataclass
class LatencyTable(LatencyModel):
    """AOWS's fitted tables (module docstring): ``pairs[l][i, j]`` seconds for choice ``i`` of group
    ``l`` and ``j`` of group ``l + 1``. ``validation_error`` is the mean relative error and
    ``validation_nrmse`` AOWS's RMSE / mean on the held-out configurations; ``coverage`` the
    fraction of entries used by at least one timed configuration; ``violations`` the number of
    neighbouring entries out of order by more than 1e-6 of the mean entry."""

    space: SearchSpace
    pairs: list
    regularize: float = 0.0
    validation_error: float | None = None
    validation_nrmse: float | None = None
    coverage: float = 1.0
    violations: int = 0

    def predict(self, paths) -> np.ndarray:
        P = _check_paths(self.space, paths)
        return sum(self.pairs[l][P[:, l], P[:, l + 1]] for l in range(self.space.num_layers - 1))

    def predict_channels(self, channels: dict) -> float:
        """Predicted seconds of a ``{group: channels}`` configuration; the table knows only the
        choices (ValueError otherwise)."""
        return float(self.predict([self.space.path(channels)])[0])

    def table(self) -> np.ndarray:
        L, K = self.space.num_layers, self.space.max_choices
        t = np.full((L - 1, K, K), np.inf)
        for l, p in enumerate(self.pairs):
            t[l, :p.shape[0], :p.shape[1]] = p
        return t


def _solve(M, y, K, regularize, max_iter):
    """min_{x >= 0} ||M x - y||^2 + regularize ||max(K x, 0)||^2 by L-BFGS-B from x = 0."""
    from scipy.optimize import minimize

    Mt, Kt = M.T.tocsr(), K.T.tocsr()

    def f(x):
        r = M @ x - y
        h = np.maximum(K @ x, 0.0) if regularize else None
        val = float(r @ r) + (regularize * float(h @ h) if regularize else 0.0)
        g = 2.0 * (Mt @ r) + (2.0 * regularize * (Kt @ h) if regularize else 0.0)
        return val, g

    res = minimize(f, np.zeros(M.shape[1]), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * M.shape[1],
                   options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": 1e-15, "gtol": 1e-12,
                            "maxcor": 30})
    return np.maximum(res.x, 0.0)


def fit_latency_table(space: SearchSpace, paths, seconds, regularize: float = 1.0, validation_fraction: float = 0.2,
                      seed: int = 0, max_iter: int = 20000) -> LatencyTable:
    """Fits AOWS's tables (module docstring) to ``seconds``, the measured latencies of ``paths``.

    Args:
        regularize: the monotonicity weight kappa (AOWS ``--regularize``, in ms^2 units; 0: plain NNLS).
        validation_fraction: held-out configurations (random, ``seed``) for the reported errors;
            the returned tables are refitted on all timings.
        max_iter: L-BFGS-B iterations.
    """
    if not isinstance(space, SearchSpace) or not space.is_chain or space.num_layers < 2:
        raise ValueError("fit_latency_table needs a chain SearchSpace with at least two groups")
    paths = [list(p) for p in paths]
    y = np.asarray(seconds, dtype=np.float64).reshape(-1) * 1e3  # AOWS's units: milliseconds
    if len(paths) != y.size:
        raise ValueError(f"need one timing per configuration, got {len(paths)} paths and {y.size} timings")
    if y.size == 0 or not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("timings must be a non-empty list of finite positive seconds")
    if isinstance(regularize, bool) or not isinstance(regularize, numbers.Real) or not regularize >= 0:
        raise ValueError(f"regularize must be a number >= 0, got {regularize!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    M, K = pair_design(space, paths), monotonicity_matrix(space)
    err = nrmse = None
    n_val = int(round(validation_fraction * y.size))
    if n_val > 0:
        if y.size - n_val < 1:
            raise ValueError("too few timings to hold out a validation set")
        perm = np.random.default_rng(seed).permutation(y.size)
        val, tr = perm[:n_val], perm[n_val:]
        x = _solve(M[tr], y[tr], K, float(regularize), max_iter)
        pred = M[val] @ x
        err = float(np.mean(np.abs(pred - y[val]) / y[val]))
        nrmse = float(np.sqrt(np.mean((pred - y[val]) ** 2)) / np.mean(y[val]))
    x = _solve(M, y, K, float(regularize), max_iter)
    off = _offsets(space)
    pairs = [x[off[l]:off[l + 1]].reshape(len(space.choices[l]), len(space.choices[l + 1])) * 1e-3
             for l in range(space.num_layers - 1)]
    used = np.asarray(M.sum(0)).reshape(-1) > 0
    scale = max(float(x.mean()), 1e-300)
    viol = int(((K @ x) > 1e-6 * scale).sum()) if K.shape[0] else 0
    return LatencyTable(space, pairs, float(regularize), err, nrmse, float(used.mean()), viol)
