"""Width search on residual (non-chain) nets: tied widths, exact min-sum by variable elimination.

In a ResNet or MobileNet-v2 the layers joined by a residual add share one width group
(``slimkern.slimmify``), so a configuration is still one channel count per group, but the
groups no longer form a chain: a stage group ``s`` is read and written by every block of the
stage, each block's hidden group ``h`` sits between ``s`` and itself (or the next stage's
group at a downsampling block). MACs and params remain sums of per-layer terms, each a
function of the (at most two) groups the layer reads and writes, so with unary statistics
``U_g(c_g)`` the Lagrangian of a budgeted platform is a pairwise MRF

.. math:: \\min_c \\sum_g U_g(c_g) + \\gamma \\sum_{(a, b)} R_{ab}(c_a, c_b).

Its graph is a tree-like "stage chain with leaves": eliminating a hidden group (it touches
one or two stage groups) leaves a factor on those, and the stage groups form a chain. We
solve it exactly by min-sum variable elimination (greedy smallest-new-factor order; a net
whose elimination would create a factor of more than ``max_factor`` entries is refused with
a clear error), with back-tracking for the arg-min, and find each platform's ``gamma`` by
bisection exactly as ``viterbi_budget`` does on chains: the path found is optimal among all
configurations using at most its own resource (the Lagrangian certificate, tested against
brute force). Peak activation is not a sum, so only MACs and params budgets are served here.
"""
from __future__ import annotations

import time

import numpy as np
import torch.nn as nn

from slimkern.nas.costs import _trace_layers
from slimkern.nas.platforms import check_platforms
from slimkern.nas.space import SearchSpace
from slimkern.switch import Switch

__all__ = ["GraphCostModel", "graph_cost_model", "graph_search", "min_sum"]


class GraphCostModel:
    """MACs / params of any group structure as factors over one or two groups.

    ``factors(kind)`` is a list of ``(scope, table)``: ``scope`` a tuple of group indices
    (sorted), ``table`` an array with one axis per scope group over its choices; the sum over
    the factors at a configuration equals ``evaluate`` (and ``slimkern.profile``)."""

    def __init__(self, space: SearchSpace, layers, fusion_bias: int, input_size):
        self.space, self.layers = space, layers
        self.fusion_bias, self.input_size = int(fusion_bias), tuple(input_size)
        self._pos = {g: i for i, g in enumerate(space.groups)}
        self._factors: dict[str, list] = {}

    def _check_kind(self, kind):
        if kind not in ("macs", "params"):
            raise ValueError(f"graph search serves 'macs' and 'params' budgets (peak activation is a maximum, "
                             f"not a sum over layers), got {kind!r}")

    def evaluate(self, channels, kind: str = "macs") -> int:
        """MACs or params of a ``{group: channels}`` configuration (or a per-layer switch)."""
        self._check_kind(kind)
        if isinstance(channels, Switch):
            channels = {g: rs[0][1] for g, rs in channels._channels}
        missing = [g for g in self.space.groups if g not in channels]
        if missing:
            raise ValueError(f"configuration has no channels for groups {missing}")
        total = self.fusion_bias if kind == "params" else 0
        for ly in self.layers:
            ci = channels[ly.gin] if ly.gin is not None else ly.cin
            co = channels[ly.gout] if ly.gout is not None else ly.cout
            total += ly.cost(ci, co)[0 if kind == "macs" else 1]
        return int(total)

    def of_path(self, path, kind: str = "macs") -> int:
        return self.evaluate(self.space.channels(path), kind)

    def factors(self, kind: str = "macs") -> list[tuple[tuple[int, ...], np.ndarray]]:
        self._check_kind(kind)
        if kind in self._factors:
            return self._factors[kind]
        ch = [np.asarray(c, dtype=np.float64) for c in self.space.choices]
        acc: dict[tuple[int, ...], np.ndarray] = {}
        const = float(self.fusion_bias if kind == "params" else 0)
        pick = 0 if kind == "macs" else 1
        for ly in self.layers:
            gi = self._pos[ly.gin] if ly.gin is not None else None
            go = self._pos[ly.gout] if ly.gout is not None else None
            if gi is not None and go is not None and gi != go:
                a, b = sorted((gi, go))
                ci = ch[gi][:, None] if gi == a else ch[gi][None, :]
                co = ch[go][None, :] if go == b else ch[go][:, None]
                v = np.broadcast_to(np.asarray(ly.cost(ci, co)[pick], dtype=np.float64), (len(ch[a]), len(ch[b])))
                acc[(a, b)] = acc.get((a, b), 0) + v
            elif gi is None and go is None:
                const += float(ly.cost(ly.cin, ly.cout)[pick])
            else:
                g = gi if gi is not None else go
                ci = ch[g] if ly.gin is not None else ly.cin
                co = ch[g] if ly.gout is not None else ly.cout
                v = np.broadcast_to(np.asarray(ly.cost(ci, co)[pick], dtype=np.float64), (len(ch[g]),))
                acc[(g,)] = acc.get((g,), 0) + v
        out = [(s, np.array(t, dtype=np.float64)) for s, t in acc.items()]
        out.append(((), np.array(const)))
        self._factors[kind] = out
        return out


def graph_cost_model(net: nn.Module, space: SearchSpace, input_size=(1, 3, 32, 32)) -> GraphCostModel:
    """The :class:`GraphCostModel` of ``net`` over ``space`` (``search_space(net, require_chain=False)``)."""
    if not isinstance(space, SearchSpace):
        raise TypeError(f"space must be a SearchSpace (slimkern.nas.search_space(net, require_chain=False)), "
                        f"got {type(space).__name__}")
    input_size = tuple(int(s) for s in input_size)
    if not input_size or any(s <= 0 for s in input_size):
        raise ValueError(f"input_size must be positive dims, got {input_size}")
    layers, _, fusion = _trace_layers(net, space, input_size)
    unknown = {g for ly in layers for g in (ly.gin, ly.gout) if g is not None} - set(space.groups)
    if unknown:
        raise ValueError(f"the net has groups {sorted(unknown)} that the search space does not list")
    return GraphCostModel(space, layers, fusion, input_size)


class _Plan:
    """The elimination order and axis bookkeeping of one factor structure (scopes and sizes), computed
    once; :meth:`run` then eliminates batches of tables (leading axis) with numpy only."""

    def __init__(self, sizes, scopes, max_factor):
        self.sizes = [int(k) for k in sizes]
        pool = {i: tuple(s) for i, s in enumerate(scopes)}
        nxt = len(scopes)
        self.steps = []  # (v, rest, [(id, transpose order, broadcast shape)], new id)
        remaining = set(range(len(sizes)))
        while remaining:
            def new_scope(v):
                return sorted({u for s in pool.values() if v in s for u in s} - {v})
            v = min(remaining, key=lambda v: (int(np.prod([self.sizes[u] for u in new_scope(v)])), v))
            rest = new_scope(v)
            size = int(np.prod([self.sizes[u] for u in rest])) * self.sizes[v]
            if size > max_factor:
                raise ValueError(f"graph search: eliminating group {v} needs a factor of {size:,} entries "
                                 f"(> {max_factor:,}); the width groups of this net are too entangled for exact search")
            scope = rest + [v]
            parts = []
            for fid, sc in list(pool.items()):
                if v not in sc:
                    continue
                order = sorted(range(len(sc)), key=lambda k: scope.index(sc[k]))
                shape = [1] * len(scope)
                for k in order:
                    shape[scope.index(sc[k])] = self.sizes[sc[k]]
                parts.append((fid, [0] + [k + 1 for k in order], shape))
                del pool[fid]
            pool[nxt] = tuple(rest)
            self.steps.append((v, tuple(rest), parts, nxt))
            nxt += 1
            remaining.discard(v)
        self.final = list(pool)  # scalar factors left

    def run(self, tables):
        """``tables[i]``: ``[B, *sizes of scope i]``. Returns ``(assignments [B, n], values [B])``."""
        env = dict(enumerate(tables))
        B = max(t.shape[0] for t in tables)
        args = []
        for v, rest, parts, nid in self.steps:
            total = np.zeros([B] + [self.sizes[u] for u in rest] + [self.sizes[v]])
            for fid, order, shape in parts:
                t = env.pop(fid)
                total = total + np.transpose(t, order).reshape([t.shape[0]] + shape)
            args.append(np.argmin(total, axis=-1))
            env[nid] = np.min(total, axis=-1)
        value = sum(np.broadcast_to(env[f], (B,)) for f in self.final) if self.final else np.zeros(B)
        x = np.zeros((B, len(self.sizes)), dtype=np.int64)
        for (v, rest, _, _), arg in zip(reversed(self.steps), reversed(args)):
            idx = (np.arange(B),) + tuple(x[:, u] for u in rest)
            x[:, v] = arg[idx]
        return x, np.asarray(value, dtype=np.float64)


def min_sum(sizes, factors, max_factor: int = 5_000_000) -> tuple[list[int], float]:
    """``argmin_x sum_f table_f[x_scope(f)]`` over variables with ``sizes[v]`` states, by
    variable elimination (module docstring). Returns ``(assignment, value)``."""
    plan = _Plan(sizes, [s for s, _ in factors], max_factor)
    x, val = plan.run([np.asarray(t, dtype=np.float64)[None] for _, t in factors])
    return [int(i) for i in x[0]], float(val[0])


class _Lagrangian:
    """``argmin_c U(c) + gamma R(c)`` for a batch of gammas, on one compiled plan."""

    def __init__(self, space, unary, factors, max_factor):
        sizes = [len(c) for c in space.choices]
        self.unary = [((l,), unary[l, :sizes[l]]) for l in range(space.num_layers)]
        self.factors = factors
        self.plan = _Plan(sizes, [s for s, _ in self.unary] + [s for s, _ in factors], max_factor)

    def __call__(self, gammas) -> np.ndarray:
        g = np.asarray(gammas, dtype=np.float64)
        tables = [t[None] for _, t in self.unary]
        tables += [g.reshape((-1,) + (1,) * np.ndim(t)) * np.asarray(t)[None] for _, t in self.factors]
        return self.plan.run(tables)[0]


def graph_search(cm: GraphCostModel, stats, platforms, cost: str | None = None, *, max_iter: int = 40,
                 max_factor: int = 5_000_000, require_weights: bool = False):
    """Per platform, the configuration minimising the unary statistics under its MACs / params
    budget on a residual net (module docstring); same inputs and result as
    :func:`slimkern.nas.search` (``stats``: ``UnaryStats`` or an ``[L, K]`` array)."""
    from slimkern.nas.search import SearchResult, _cost_kind, _least_resource, _platform_results, _unary

    if not isinstance(cm, GraphCostModel):
        raise TypeError(f"graph_search needs a GraphCostModel (graph_cost_model(net, space, input_size)), "
                        f"got {type(cm).__name__}")
    platforms = check_platforms(platforms, require_weights=require_weights)
    kind = _cost_kind(platforms, cost)
    cm._check_kind(kind)
    space = cm.space
    u = _unary(stats, space)
    factors = cm.factors(kind)
    least = _least_resource(platforms, cm, kind)
    t0 = time.perf_counter()
    solve = _Lagrangian(space, u, factors, max_factor)
    P = len(platforms)
    budgets = np.array([p.budget for p in platforms], dtype=np.float64)

    def resource(paths):
        return np.array([cm.of_path(x, kind) for x in paths], dtype=np.float64)

    # all platforms bisect together, one batched elimination per step (as viterbi_budget)
    best = solve(np.zeros(P))
    ok = resource(best) <= budgets
    gam = np.zeros(P)
    finite = u[np.isfinite(u)]
    spread = float(finite.max() - finite.min()) if finite.size else 1.0
    lo, hi = np.zeros(P), np.full(P, max(spread, 1e-12) / max(least, 1.0))
    todo = ~ok
    while todo.any():  # grow gamma until the narrow side of every platform fits
        ph = solve(hi)
        fits = resource(ph) <= budgets
        grow = todo & ~fits
        lo[grow], hi[grow] = hi[grow], hi[grow] * 4
        done = todo & fits
        best[done], gam[done] = ph[done], hi[done]
        todo = grow
    search_ = ~ok
    if search_.any():
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            pm = solve(mid)
            fits = resource(pm) <= budgets
            take = search_ & fits
            hi[take], best[take], gam[take] = mid[take], pm[take], mid[take]
            lo[search_ & ~fits] = mid[search_ & ~fits]
    return SearchResult(_platform_results(platforms, best, gam, cm, kind, u), time.perf_counter() - t0)
