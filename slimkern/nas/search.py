"""Per-platform optimal width search (OWS) by Viterbi under a budget, and the AOWS sampler.

For platform ``k`` with budget ``R_k`` (Wang & Blaschko, Sec. 3; Berman et al., AOWS, Sec. 3):

.. math:: c_k = \\arg\\min_c \\sum_l L_l(c_l) \\quad \\text{s.t.} \\quad \\sum_l R_l(c_l, c_{l+1}) \\le R_k,

solved through the Lagrangian ``min_c sum_l L_l(c_l) + gamma_k R_l(c_l, c_{l+1})`` with the
smallest ``gamma_k >= 0`` (doubling, then bisection) whose Viterbi path meets the budget
(``slimkern.solvers.viterbi_budget``, all platforms in one batched call). The path found is
the cheapest of all configurations using at most its own resource; between two Lagrangian
breakpoints a budget can leave a duality gap. A peak-activation budget is a maximum over the
chain, so it forbids the pairs above it and plain Viterbi gives the exact optimum.

AOWS training samples configurations from the smoothed Viterbi: with temperature ``T``,
``p(c) ∝ exp(-(sum_l L_l(c_l) + gamma_k sum_l R_l(c_l, c_{l+1})) / T)`` and each layer draws
its choice from its marginal ``p_l`` (``slimkern.solvers.viterbi_marginals``), after a warm-up
of uniform sampling (OWS). ``T`` follows AOWS's schedule, log-linear per iteration between set
points: ``(0, 1), (warmup, 1), (warmup + 1, 1e-2), (epochs / 2, 1e-3), (epochs, 5e-4)``.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
import torch

from slimkern.nas.costs import CostModel, cost_model
from slimkern.nas.platforms import Platform, check_platforms
from slimkern.nas.space import SearchSpace
from slimkern.nas.unary import UnaryStats
from slimkern.switch import Switch

__all__ = ["AOWSSampler", "PlatformResult", "SearchResult", "aows_schedule", "schedule_temperature", "search"]


@dataclass
class PlatformResult:
    """What the search found for one platform."""

    platform: Platform
    switch: Switch
    path: list[int]
    channels: dict[str, int]
    resource: float        # MACs / params / peak bytes of the configuration found
    predicted_loss: float  # sum_l L_l(c_l)
    gamma: float           # the Lagrange multiplier (0 for peak-activation budgets)

    @property
    def budget_percent(self) -> float:
        """Resource as a percentage of the budget (<= 100)."""
        return 100.0 * self.resource / self.platform.budget

    def as_dict(self) -> dict:
        p = self.platform
        return {"platform": p.name, "weight": p.weight, "cost": p.cost, "budget": p.budget,
                "resource": self.resource, "budget_percent": self.budget_percent, "switch": str(self.switch),
                "channels": dict(self.channels), "path": list(self.path), "predicted_loss": self.predicted_loss,
                "gamma": self.gamma}


class SearchResult(dict):
    """``{platform name: Switch}``; ``.details[name]`` is the :class:`PlatformResult`, ``.seconds``
    the solver time."""

    def __init__(self, details: dict[str, PlatformResult], seconds: float):
        super().__init__({k: v.switch for k, v in details.items()})
        self.details, self.seconds = details, seconds

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "platforms": [d.as_dict() for d in self.details.values()]}


def _unary(stats, space: SearchSpace) -> np.ndarray:
    if isinstance(stats, UnaryStats):
        if stats.space != space:
            raise ValueError("the unary statistics were recorded on another search space than the cost model's")
        return stats.unary()
    u = stats.detach().cpu().numpy() if isinstance(stats, torch.Tensor) else np.asarray(stats, dtype=np.float64)
    want = (space.num_layers, space.max_choices)
    if u.shape != want:
        raise ValueError(f"unary statistics must be UnaryStats or an array of shape {want}, got {u.shape}")
    u = u.astype(np.float64).copy()
    for l, ch in enumerate(space.choices):
        if not np.isfinite(u[l, :len(ch)]).all():
            raise ValueError(f"unary statistics of group {space.groups[l]!r} must be finite on its choices")
        u[l, len(ch):] = np.inf
    return u


def _costs(net, stats, input_size) -> CostModel:
    if isinstance(net, CostModel):
        return net
    space = stats.space if isinstance(stats, UnaryStats) else None
    if space is None:
        raise ValueError("search(net, stats=array) needs a CostModel as its first argument "
                         "(slimkern.nas.cost_model(net, space, input_size)); with UnaryStats a net is enough")
    if input_size is None:
        raise ValueError("search(net, ...) needs input_size (e.g. (1, 3, 32, 32)) to count MACs and activations")
    return cost_model(net, space, input_size)


def _cost_kind(platforms, cost):
    kind = platforms[0].cost
    if cost is not None and cost != kind:
        raise ValueError(f"cost={cost!r} but the platforms' budgets are in {kind!r}")
    return kind


def _least_resource(platforms, cm, kind) -> float:
    """The resource of the narrowest configuration (every cost is monotone in the channels, so
    no configuration needs less); ValueError naming the first platform whose budget is below."""
    least = float(cm.of_path(cm.space.min_path(), kind))
    for p in platforms:
        if p.budget < least:
            raise ValueError(f"platform {p.name!r}: budget {p.budget:.6g} {kind} is infeasible: the narrowest "
                             f"configuration already needs {least:.6g} ({100 * p.budget / least:.1f}% of it)")
    return least


def _platform_results(platforms, paths, gammas, cm, kind, u) -> dict:
    """``{platform name: PlatformResult}`` of one chosen choice path (and multiplier) per platform."""
    details = {}
    for k, p in enumerate(platforms):
        path = [int(i) for i in paths[k]]
        ch = cm.space.channels(path)
        details[p.name] = PlatformResult(p, Switch.from_channels(ch), path, ch, float(cm.evaluate(ch, kind)),
                                         float(sum(u[l, i] for l, i in enumerate(path))), float(gammas[k]))
    return details


def search(net, stats, platforms, cost: str | None = None, *, input_size=None, max_iter: int = 40,
           require_weights: bool = False) -> SearchResult:
    """Optimal width configuration of every platform (module docstring).

    Args:
        net: a :class:`CostModel`, or the net itself (then ``stats`` must be :class:`UnaryStats` and
            ``input_size`` is needed), or a ``GraphCostModel`` of a residual net
            (``slimkern.nas.graph_search``: MACs / params budgets).
        stats: :class:`UnaryStats` or an ``[L, K]`` array of unary costs ``L_l(c_l)``.
        platforms: ``Platform`` list (one cost kind).
        cost: ``"macs"``, ``"params"`` or ``"peak_activation"``; default: the platforms' kind.
        max_iter: bisection steps on each ``gamma_k``.
        require_weights: also check that the platform weights sum to 1.

    Returns:
        :class:`SearchResult`: ``{platform name: Switch.from_channels(...)}`` with ``.details``.

    Raises:
        ValueError: empty platform list, bad statistics, or a budget below the least resource any
            configuration needs (the message names the platform and that least resource).
    """
    from slimkern.nas.graph_search import GraphCostModel, graph_search
    if isinstance(net, GraphCostModel):  # residual nets: tied widths, exact elimination instead of Viterbi
        return graph_search(net, stats, platforms, cost, max_iter=max_iter, require_weights=require_weights)
    platforms = check_platforms(platforms, require_weights=require_weights)
    kind = _cost_kind(platforms, cost)
    cm = _costs(net, stats, input_size)
    space = cm.space
    u = _unary(stats, space)
    table = cm.table(kind)
    t0 = time.perf_counter()
    budgets = np.array([p.budget for p in platforms], dtype=np.float64)
    _least_resource(platforms, cm, kind)
    from slimkern import solvers
    P = len(platforms)
    if kind == "peak_activation":
        pair = np.where(table[None] <= budgets[:, None, None, None], 0.0, np.inf)
        paths, _ = solvers.viterbi(np.broadcast_to(u, (P,) + u.shape).copy(), pair)
        gammas = np.zeros(P)
    else:
        res = solvers.viterbi_budget(np.broadcast_to(u, (P,) + u.shape).copy(),
                                     np.broadcast_to(table, (P,) + table.shape).copy(), budgets, max_iter)
        paths, gammas = res.path, res.gamma
    seconds = time.perf_counter() - t0
    details = _platform_results(platforms, paths, gammas, cm, kind, u)
    for p in platforms:
        assert details[p.name].resource <= p.budget * (1 + 1e-9), "internal error: a path over its budget"
    return SearchResult(details, seconds)


# --------------------------------------------------------------------------- AOWS sampling

def aows_schedule(epochs: int, warmup: int = 5, min_temp: float = 5e-4) -> list[tuple[float, float]]:
    """AOWS's temperature set points ``(epoch, T)``: 1 until ``warmup``, 1e-2 one epoch later,
    1e-3 at ``epochs / 2``, ``min_temp`` at ``epochs`` (points not after their predecessor dropped)."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or not 0 <= warmup < epochs:
        raise ValueError(f"warmup must be an int in [0, epochs), got {warmup!r}")
    pts = [(0.0, 1.0), (float(warmup), 1.0), (warmup + 1.0, 1e-2), (epochs / 2, 1e-3), (float(epochs), min_temp)]
    out = [pts[0]]
    for e, t in pts[1:]:
        if e > out[-1][0]:
            out.append((e, t))
    return out


def schedule_temperature(points, epoch: float) -> float:
    """Temperature at (fractional) ``epoch``: log-linear between consecutive set points
    ``(e_i, T_i)``, ``T_last`` after the last, ``T_0`` before the first."""
    pts = [(float(e), float(t)) for e, t in points]
    if not pts or any(t <= 0 or not math.isfinite(t) for _, t in pts):
        raise ValueError(f"temperature set points must be (epoch, T > 0) pairs, got {points!r}")
    if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        raise ValueError(f"temperature set points need strictly increasing epochs, got {points!r}")
    if epoch <= pts[0][0]:
        return pts[0][1]
    for (e0, t0), (e1, t1) in zip(pts, pts[1:]):
        if epoch < e1:
            r = (epoch - e0) / (e1 - e0)
            return 10 ** ((1 - r) * math.log10(t0) + r * math.log10(t1))
    return pts[-1][1]


class AOWSSampler:
    """Draws training configurations: a platform ``k`` with probability ``nu_k`` (its weight by
    default), then per layer a choice from the smoothed-Viterbi marginals of that platform
    (uniform during the warm-up, or always with ``adaptive=False``: OWS).

    Args:
        costs: the :class:`CostModel`; stats: the :class:`UnaryStats` being recorded.
        platforms: the target platforms (their budgets fix each ``gamma_k``).
        epochs: training epochs; warmup: uniform epochs first (AOWS: 5).
        schedule: temperature set points (default :func:`aows_schedule`).
        adaptive: False samples uniformly throughout (OWS).
        sampling_weights: ``nu_k`` (default: the platform weights).
        generator: a ``torch.Generator`` for the draws.
    """

    def __init__(self, costs: CostModel, stats: UnaryStats, platforms, epochs: int, warmup: int = 5,
                 schedule=None, adaptive: bool = True, sampling_weights=None, generator=None,
                 max_iter: int = 20):
        if not isinstance(costs, CostModel):
            raise TypeError(f"costs must be a CostModel, got {type(costs).__name__}")
        if not isinstance(stats, UnaryStats) or stats.space != costs.space:
            raise ValueError("stats must be the UnaryStats of the cost model's search space")
        self.platforms = check_platforms(platforms, require_weights=False)
        self.kind = _cost_kind(self.platforms, None)
        self.costs, self.stats, self.adaptive, self.max_iter = costs, stats, bool(adaptive), max_iter
        self.schedule = aows_schedule(epochs, warmup) if schedule is None else list(schedule)
        schedule_temperature(self.schedule, 0.0)  # validates
        self.epochs, self.warmup = int(epochs), int(warmup)
        nu = [p.weight for p in self.platforms] if sampling_weights is None else list(sampling_weights)
        nu = np.asarray(nu, dtype=np.float64)
        if nu.shape != (len(self.platforms),) or (nu < 0).any() or not nu.sum() > 0:
            raise ValueError(f"sampling_weights must be {len(self.platforms)} non-negative numbers with a positive "
                             f"sum, got {nu.tolist()}")
        self.nu = torch.as_tensor(nu / nu.sum())
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.last_temperature: float | None = None

    def temperature(self, epoch: float) -> float:
        return schedule_temperature(self.schedule, epoch)

    def probabilities(self, platform: int, temperature: float) -> np.ndarray:
        """``[L, K]`` marginals of ``exp(-(unary + gamma_k resource) / T)`` for platform ``platform``."""
        from slimkern import solvers
        u = self.stats.unary()
        table = self.costs.table(self.kind)
        p = self.platforms[platform]
        if self.kind == "peak_activation":
            pair = np.where(table <= p.budget, 0.0, np.inf)
        else:
            gamma = float(solvers.viterbi_budget(u, table, p.budget, self.max_iter).gamma)
            pair = np.where(np.isinf(table), np.inf, gamma * np.where(np.isinf(table), 0.0, table))
        return np.asarray(solvers.viterbi_marginals(u, pair, float(temperature)))

    def sample(self, epoch: float) -> tuple[int, list[int]]:
        """``(platform index, path)`` for a step at (fractional) ``epoch``."""
        k = int(torch.multinomial(self.nu, 1, generator=self.generator))
        sp = self.costs.space
        if not self.adaptive or epoch < self.warmup:
            self.last_temperature = None
            path = [int(torch.randint(len(c), (1,), generator=self.generator)) for c in sp.choices]
            return k, path
        T = self.temperature(epoch)
        self.last_temperature = T
        marg = self.probabilities(k, T)
        path = []
        for l, ch in enumerate(sp.choices):
            p = torch.as_tensor(np.nan_to_num(marg[l, :len(ch)], nan=0.0)).clamp_min(0)
            if not float(p.sum()) > 0:
                p = torch.ones(len(ch), dtype=torch.float64)
            path.append(int(torch.multinomial(p, 1, generator=self.generator)))
        return k, path
