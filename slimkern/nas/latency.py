"""Latency as a chain cost: time random configurations, fit per-pair terms, check on held-out ones.

AOWS (Berman et al., CVPR 2020, Sec. 3.3) models a network's latency as a sum of per-layer
terms, each a function of the layer's input and output channels, ``T(c) ~ sum_l
T_l(c_l, c_{l+1})``, fitted by least squares on timings of random configurations with a
penalty keeping ``T_l`` monotone in the channels. Here each pair term is bilinear with
non-negative coefficients,

.. math:: T_l(c_l, c_{l+1}) = a_l c_l + b_l c_{l+1} + e_l c_l c_{l+1} \\; (+\\, t_0 / (L-1)),
          \\quad a_l, b_l, e_l, t_0 \\ge 0,

fitted by non-negative least squares (``scipy.optimize.nnls``): the sign constraints make every
term monotone by construction, and four numbers per pair need far fewer timings than AOWS's
full ``K x K`` tables (a conv's MACs are bilinear in its channels, a depthwise conv's linear).
Timings come from the net itself (``slimkern``'s own kernels, eval mode, no grad), median of
``repeats`` runs after ``warmup`` runs; :func:`fit_latency` reports the relative error on the
held-out configurations.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from slimkern.nas.space import SearchSpace

__all__ = ["BilinearLatency", "LatencyModel", "fit_latency", "measure_latency"]


def measure_latency(net, space: SearchSpace, paths, input_size, repeats: int = 5, warmup: int = 2,
                    progress: bool = False, reduction: str = "median") -> np.ndarray:
    """Forward time (seconds) of ``net`` under each configuration (list of choice paths): the
    median of ``repeats`` runs, or their minimum (``reduction="min"``, AOWS's option against
    variance: on a shared machine other jobs only ever add time)."""
    if reduction not in ("median", "min"):
        raise ValueError(f"reduction must be 'median' or 'min', got {reduction!r}")
    from tqdm.auto import tqdm

    from slimkern.nas.train import drop_bn_rows
    from slimkern.nn.switching import use_switch
    from slimkern.timing import time_calls, timing_stats

    for what, v in (("repeats", repeats), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (1 if what == "repeats" else 0):
            raise ValueError(f"{what} must be an int >= {1 if what == 'repeats' else 0}, got {v!r}")
    p = next(net.parameters())
    x = torch.randn(tuple(input_size), dtype=p.dtype, device=p.device)
    was_training = net.training
    net.eval()
    out = []
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fresh BN rows: timing only
            for path in tqdm(list(paths), desc="timing configurations", disable=not progress, leave=False):
                sw = space.switch(path)
                with use_switch(net, sw):
                    ts = timing_stats(time_calls(net, x, warmup=warmup, repeats=repeats))
                out.append(ts[reduction])
                drop_bn_rows(net, [sw])
    finally:
        net.train(was_training)
    return np.asarray(out)


class LatencyModel:
    """A fitted latency model of a search space: ``predict(paths)`` (seconds),
    ``predict_channels({group: channels})`` and ``table()``, the ``[L-1, K, K]`` chain table with
    ``sum_l table[l, c_l, c_{l+1}]`` the predicted seconds (``+inf`` on padded choices).
    Two fits: :func:`fit_latency` (bilinear terms, :class:`BilinearLatency`) and
    :func:`slimkern.nas.fit_latency_table` (AOWS's full tables, :class:`LatencyTable`)."""

    space: SearchSpace
    validation_error: float | None = None

    def predict(self, paths) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_channels(self, channels: dict) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def table(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class BilinearLatency(LatencyModel):
    """Fitted per-pair bilinear latency terms (module docstring); ``table()`` is the chain table."""

    space: SearchSpace
    a: np.ndarray   # [L-1] coefficient of c_l
    b: np.ndarray   # [L-1] coefficient of c_{l+1}
    e: np.ndarray   # [L-1] coefficient of c_l c_{l+1}
    t0: float       # constant
    validation_error: float | None = None  # mean |pred - measured| / measured on held-out configurations

    def predict(self, paths) -> np.ndarray:
        """Predicted seconds of configurations given as choice paths."""
        X = _features(self.space, paths)
        return X @ self._coef()

    def predict_channels(self, channels: dict) -> float:
        """Predicted seconds of a ``{group: channels}`` configuration (any channel counts)."""
        c = np.array([float(channels[g]) for g in self.space.groups])
        return float(self.t0 + self.a @ c[:-1] + self.b @ c[1:] + self.e @ (c[:-1] * c[1:]))

    def _coef(self):
        return np.concatenate([[self.t0], self.a, self.b, self.e])

    def table(self) -> np.ndarray:
        sp = self.space
        L, K = sp.num_layers, sp.max_choices
        t = np.full((L - 1, K, K), np.inf)
        for l in range(L - 1):
            ci = np.asarray(sp.choices[l], dtype=np.float64)[:, None]
            cj = np.asarray(sp.choices[l + 1], dtype=np.float64)[None, :]
            t[l, :ci.shape[0], :cj.shape[1]] = (self.t0 / (L - 1) + self.a[l] * ci + self.b[l] * cj
                                                + self.e[l] * ci * cj)
        return t


def _features(space: SearchSpace, paths) -> np.ndarray:
    L = space.num_layers
    rows = []
    for path in paths:
        c = np.array([space.choices[l][int(i)] for l, i in enumerate(path)], dtype=np.float64)
        if len(path) != L:
            raise ValueError(f"a path needs {L} choices, got {len(path)}")
        rows.append(np.concatenate([[1.0], c[:-1], c[1:], c[:-1] * c[1:]]))
    return np.asarray(rows)


def fit_latency(space: SearchSpace, paths, seconds, validation_fraction: float = 0.2, seed: int = 0) -> BilinearLatency:
    """Non-negative least squares fit of the per-pair terms to measured ``seconds``; a
    ``validation_fraction`` of the configurations is held out and the model's mean relative error
    on them is stored in ``validation_error`` (then the model is refitted on all)."""
    paths = [list(p) for p in paths]
    y = np.asarray(seconds, dtype=np.float64).reshape(-1)
    if len(paths) != y.size:
        raise ValueError(f"need one timing per configuration, got {len(paths)} paths and {y.size} timings")
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("timings must be finite and positive")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    L = space.num_layers
    n_coef = 3 * (L - 1) + 1
    if y.size * (1 - validation_fraction) < n_coef + 1:
        raise ValueError(f"too few timings ({y.size}) for a chain of {L} groups ({n_coef} coefficients): time at "
                         f"least {int(np.ceil((n_coef + 1) / (1 - validation_fraction)))} configurations")
    X = _features(space, paths)

    def solve(Xs, ys):
        from scipy.optimize import nnls
        scale = np.maximum(Xs.max(0), 1e-12)
        coef, _ = nnls(Xs / scale, ys)
        return coef / scale

    err = None
    n_val = int(round(validation_fraction * y.size))
    if n_val > 0:
        perm = np.random.default_rng(seed).permutation(y.size)
        val, tr = perm[:n_val], perm[n_val:]
        coef = solve(X[tr], y[tr])
        err = float(np.mean(np.abs(X[val] @ coef - y[val]) / y[val]))
    coef = solve(X, y)
    n = L - 1
    return BilinearLatency(space, coef[1:1 + n], coef[1 + n:1 + 2 * n], coef[1 + 2 * n:], float(coef[0]), err)
