"""Chain-MRF (Viterbi) and entropic optimal-transport (Sinkhorn) solvers.

Width search as a chain Markov random field
-------------------------------------------
AOWS/OWS (Berman et al., "AOWS: Adaptive and optimal network width search with latency
constraints", CVPR 2020) model a network's per-layer width choices ``c_1..c_L`` as a chain:
``cost(c) = sum_l unary[l, c_l] + sum_l pairwise[l, c_l, c_{l+1}]``. ``+inf`` forbids a
choice or a pair, which is also how layers with fewer than ``K`` choices are padded.

* :func:`viterbi` -- the min-sum path (dynamic programming, O(L K^2)).
* :func:`viterbi_marginals` -- the smoothed Viterbi of AOWS: the Gibbs distribution
  ``p(c) ∝ exp(-cost(c) / T)`` and its per-layer marginals, by forward-backward in log space.
  As ``T -> 0`` the marginals concentrate on the Viterbi path.
* :func:`viterbi_budget` -- the Lagrangian search for ``min cost(c) s.t. resource(c) <= budget``:
  the smallest multiplier ``gamma >= 0`` (bisection) whose min-sum path of
  ``cost + gamma * resource`` meets the budget (one problem per target platform).

Entropic optimal transport
--------------------------
:func:`sinkhorn` solves ``min_P <P, M> - reg * H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b`` (Cuturi,
NeurIPS 2013), whose solution is ``P = diag(u) exp(-M / reg) diag(v)``; it is the
alignment step of OT model fusion (Singh & Jaggi, "Model fusion via optimal transport",
NeurIPS 2020).

Backends
--------
Each function runs the C++ solver (``torch.ops.slimkern.*``, OpenMP over the batch, GIL
released while it runs) on CPU tensors when the extension is built, and otherwise a
pure-torch implementation of the same recurrences, which is much slower (tens to hundreds
of times for Sinkhorn's log domain) but runs on any device. ``backend="cpp"`` or ``"torch"``
forces one. Inputs may be torch tensors or numpy arrays; numpy in gives numpy out.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from slimkern._library import has_op, require_op

__all__ = ["BudgetResult", "sinkhorn", "viterbi", "viterbi_budget", "viterbi_marginals"]

_BACKENDS = ("auto", "cpp", "torch")


# --------------------------------------------------------------------------- helpers


def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor, came_from_numpy). Integer and other non-float inputs are refused."""
    from_numpy = isinstance(x, np.ndarray)
    if from_numpy:
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t, from_numpy


def _out(t: torch.Tensor, to_numpy: bool):
    return t.numpy() if to_numpy else t


def _backend(backend: str, op: str, *tensors: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    on_cpu = all(t is None or t.device.type == "cpu" for t in tensors)
    if backend == "cpp":
        require_op(op)
        if not on_cpu:
            raise ValueError(f"backend='cpp' needs CPU tensors; use backend='torch' for {tensors[0].device}")
        return "cpp"
    if backend == "torch":
        return "torch"
    return "cpp" if on_cpu and has_op(op) else "torch"


def _check_costs(t: torch.Tensor, name: str) -> None:
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    if (t == -math.inf).any():
        raise ValueError(f"{name} contains -inf (costs must be > -inf; +inf forbids a choice)")


def _chain_args(unary, pairwise, pname="pairwise"):
    """Checks a chain's shapes; returns (unary [P,L,K], pairwise [P,L-1,K,K], batched, numpy_out).

    The values (NaN / -inf) are checked by :func:`_check_chain_values` on the torch path; the
    C++ op checks them itself with the same messages, in one pass over its float64 copy.
    """
    u, un = _as_tensor(unary, "unary")
    p, pn = _as_tensor(pairwise, pname)
    if u.dim() not in (2, 3):
        raise ValueError(f"unary must be [L, K] or [P, L, K], got shape {tuple(u.shape)}")
    batched = u.dim() == 3
    if not batched:
        u = u.unsqueeze(0)
        p = p.unsqueeze(0) if p.dim() == 3 else p
    P, L, K = u.shape
    if L < 1 or K < 1:
        raise ValueError(f"unary needs at least one layer and one choice, got shape {tuple(u.shape)}")
    want = (P, L - 1, K, K)
    if tuple(p.shape) != want:
        shown = want if batched else want[1:]
        got = tuple(p.shape) if batched or p.dim() != 4 else tuple(p.shape[1:])
        raise ValueError(f"{pname} must have shape {shown} to match unary {tuple(unary.shape)}, got {got}")
    if u.device != p.device:
        raise ValueError(f"unary and {pname} must be on the same device, got {u.device} and {p.device}")
    dtype = torch.promote_types(u.dtype, p.dtype)
    return u.to(dtype), p.to(dtype), batched, un or pn


def _check_chain_values(u, p, pname="pairwise"):
    _check_costs(u, "unary")
    _check_costs(p, pname)


# --------------------------------------------------------------------------- Viterbi


def _viterbi_torch(u: torch.Tensor, p: torch.Tensor):
    """Batched min-sum dynamic programming; path -1 / cost +inf when every path is forbidden."""
    P, L, K = u.shape
    d = u[:, 0].to(torch.float64)
    back = []
    for l in range(1, L):
        best, arg = (d[:, :, None] + p[:, l - 1].to(torch.float64)).min(dim=1)
        back.append(arg)
        d = best + u[:, l].to(torch.float64)
    cost, last = d.min(dim=1)
    path = torch.empty(P, L, dtype=torch.long, device=u.device)
    path[:, L - 1] = last
    for l in range(L - 1, 0, -1):
        path[:, l - 1] = back[l - 1].gather(1, path[:, l : l + 1]).squeeze(1)
    path[torch.isinf(cost)] = -1
    return path, cost.to(u.dtype)


def viterbi(unary, pairwise, *, backend: str = "auto"):
    """Min-sum path of a chain MRF.

    Minimises ``sum_l unary[l, c_l] + sum_{l<L-1} pairwise[l, c_l, c_{l+1}]`` over all
    ``K^L`` paths by dynamic programming (forward min, then backtrack). ``+inf`` entries
    forbid a choice or a transition; NaN and ``-inf`` are errors.

    Args:
        unary: ``[L, K]`` or batched ``[P, L, K]`` (float32/float64, tensor or numpy).
        pairwise: ``[L-1, K, K]`` or ``[P, L-1, K, K]``; ``pairwise[l, i, j]`` is the cost of
            choice ``i`` at layer ``l`` followed by ``j`` at layer ``l+1``.
        backend: ``"auto"`` (C++ on CPU when built), ``"cpp"`` or ``"torch"`` (slower fallback).

    Returns:
        ``(path, cost)``: ``path`` int64 ``[L]`` (``[P, L]``), ``cost`` 0-d (``[P]``). When
        every path is forbidden, ``cost`` is ``+inf`` and ``path`` is all ``-1``.
    """
    u, p, batched, to_np = _chain_args(unary, pairwise)
    if _backend(backend, "viterbi", u, p) == "cpp":
        path, cost = torch.ops.slimkern.viterbi(u, p)
    else:
        _check_chain_values(u, p)
        path, cost = _viterbi_torch(u, p)
    if not batched:
        path, cost = path[0], cost[0]
    return _out(path, to_np), _out(cost, to_np)


def _marginals_torch(u: torch.Tensor, p: torch.Tensor, temperature: float):
    P, L, K = u.shape
    nu = -u.to(torch.float64) / temperature
    npw = -p.to(torch.float64) / temperature
    alpha = [nu[:, 0]]
    for l in range(1, L):
        alpha.append(nu[:, l] + torch.logsumexp(alpha[-1][:, :, None] + npw[:, l - 1], dim=1))
    beta = [torch.zeros_like(nu[:, 0])]
    for l in range(L - 2, -1, -1):
        beta.append(torch.logsumexp(npw[:, l] + (nu[:, l + 1] + beta[-1])[:, None, :], dim=2))
    beta.reverse()
    alpha, beta = torch.stack(alpha, 1), torch.stack(beta, 1)
    log_z = torch.logsumexp(alpha[:, -1], dim=1)
    marg = torch.exp(alpha + beta - log_z[:, None, None])
    marg[torch.isinf(log_z)] = math.nan
    return marg.to(u.dtype), log_z.to(u.dtype)


def _check_temperature_scale(u: torch.Tensor, p: torch.Tensor, temperature: float) -> None:
    """Refuses a temperature at which path costs / T leave float64's range.

    A path's cost is at most B = sum_i max|u_i| + sum_i max|p_i| over finite entries; the
    log-sum-exp recursion is accurate while B / T stays far below float64's 1.8e308 (at
    T = 1e-300 and costs of order 1 the C++ path returned +inf probabilities, the torch path
    rows of zeros). 1e150 leaves room for the products inside the recursion.
    """
    def bound(t: torch.Tensor) -> float:
        if t.numel() == 0:
            return 0.0
        finite = torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype)).abs()
        return float(finite.flatten(-2).amax(-1).sum(-1).max()) if t.dim() >= 2 else float(finite.max())

    scale = (bound(u) + bound(p)) / temperature
    if not math.isfinite(scale) or scale > 1e150:
        raise ValueError(f"temperature {temperature!r} is too small for these costs (path costs up to "
                         f"{bound(u) + bound(p):.3g}: cost / temperature leaves float64's range); use viterbi() "
                         f"for the temperature -> 0 limit (the one-hot optimal path)")


def viterbi_marginals(unary, pairwise, temperature: float = 1.0, *, return_log_partition: bool = False,
                      backend: str = "auto"):
    """Per-layer marginals of the smoothed (log-sum-exp) Viterbi of AOWS.

    With the Gibbs distribution ``p(c) = exp(-cost(c) / T) / Z`` over paths ``c``,
    returns ``p_l(k) = sum_{c: c_l = k} p(c)`` for every layer ``l`` and choice ``k``,
    computed by forward-backward in log space:
    ``alpha_l(k) = -unary[l,k]/T + LSE_j(alpha_{l-1}(j) - pairwise[l-1,j,k]/T)``,
    ``beta_l(j) = LSE_k(beta_{l+1}(k) - (pairwise[l,j,k] + unary[l+1,k])/T)``,
    ``p_l(k) = exp(alpha_l(k) + beta_l(k) - log Z)``. Stable for T from 1e-3 to 1e3 and with
    ``+inf`` costs (probability 0). As ``T -> 0`` the marginals become the one-hot Viterbi path.

    Args:
        unary, pairwise: as in :func:`viterbi`.
        temperature: ``T > 0``.
        return_log_partition: also return ``log Z`` (0-d or ``[P]``).

    Returns:
        ``marginals`` ``[L, K]`` (``[P, L, K]``), rows summing to 1; NaN where every path is
        forbidden. With ``return_log_partition``: ``(marginals, log_z)``.
    """
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    u, p, batched, to_np = _chain_args(unary, pairwise)
    _check_temperature_scale(u, p, float(temperature))
    if _backend(backend, "viterbi_marginals", u, p) == "cpp":
        marg, log_z = torch.ops.slimkern.viterbi_marginals(u, p, float(temperature))
    else:
        _check_chain_values(u, p)
        marg, log_z = _marginals_torch(u, p, float(temperature))
    if not batched:
        marg, log_z = marg[0], log_z[0]
    if return_log_partition:
        return _out(marg, to_np), _out(log_z, to_np)
    return _out(marg, to_np)


# --------------------------------------------------------------------------- budget


class BudgetResult(NamedTuple):
    """Result of :func:`viterbi_budget` (batched fields have a leading platform axis)."""

    path: torch.Tensor | np.ndarray  # int64 [L] or [P, L]
    cost: torch.Tensor | np.ndarray  # unary + pairwise cost of the path (without gamma)
    resource: torch.Tensor | np.ndarray  # resource the path uses (<= budget)
    gamma: torch.Tensor | np.ndarray  # the Lagrange multiplier the path is optimal for


_OK, _INFEASIBLE, _NO_PATH = 0, 1, 2


def _budget_one_torch(u, c, r, budget: float, max_iter: int):
    """One platform: same bracketing and bisection as the C++ core (core/viterbi.cpp)."""
    forbidden = torch.isinf(r) | torch.isinf(c)
    cm = torch.where(forbidden, math.inf, c)
    rm = torch.where(forbidden, 0.0, r)
    solves = 0

    def solve(gamma):
        nonlocal solves
        solves += 1
        path, val = _viterbi_torch(u[None], (cm + gamma * rm)[None])
        return path[0], float(val[0])

    def used(path):
        if path.numel() < 2:
            return 0.0
        return float(rm[torch.arange(path.numel() - 1), path[:-1], path[1:]].sum())

    def result(path, gamma, status):
        L = path.numel()
        cost = float(u[torch.arange(L), path].sum())
        if L > 1:
            cost += float(cm[torch.arange(L - 1), path[:-1], path[1:]].sum())
        return path, cost, used(path), gamma, status

    path, val = solve(0.0)
    if math.isinf(val):
        return torch.full_like(path, -1), math.inf, math.inf, 0.0, _NO_PATH
    r0 = used(path)
    if r0 <= budget:
        return result(path, 0.0, _OK)
    umask = torch.where(torch.isinf(u), math.inf, 0.0)
    least = _viterbi_torch(umask[None], torch.where(forbidden, math.inf, r)[None])[0][0]
    rmin = used(least)
    if rmin > budget:
        return result(least, math.inf, _INFEASIBLE)

    def spread(x):
        x = x[torch.isfinite(x)]
        return float(x.max() - x.min()) if x.numel() else 0.0

    L = u.shape[0]
    total = spread(u) * L + spread(cm) * (L - 1)
    lo, hi = 0.0, total / max(r0 - rmin, 1e-300)
    if not (hi > 0.0) or not math.isfinite(hi):
        hi = 1.0
    while True:
        best, _ = solve(hi)
        if used(best) <= budget:
            break
        lo, hi = hi, hi * 2.0
        if not math.isfinite(hi):
            return result(least, math.inf, _OK)
    for _ in range(max_iter):
        mid = lo + 0.5 * (hi - lo)
        if not (lo < mid < hi):
            break
        trial, _ = solve(mid)
        if used(trial) <= budget:
            hi, best = mid, trial
        else:
            lo = mid
    return result(best, hi, _OK)


def _budget_torch(u, c, r, budget, max_iter):
    P, L, _ = u.shape
    f64 = torch.float64
    cz = torch.zeros_like(r) if c is None else c
    rows = [_budget_one_torch(u[k].to(f64), cz[k].to(f64), r[k].to(f64), float(budget[k]), max_iter)
            for k in range(P)]
    path = torch.stack([row[0] for row in rows]).to(torch.long)
    cols = [torch.tensor([row[i] for row in rows], dtype=f64) for i in (1, 2, 3)]
    status = torch.tensor([row[4] for row in rows], dtype=torch.long)
    return (path, *[col.to(u.dtype) for col in cols], status)


def viterbi_budget(unary, resource_pairwise, budget, max_iter: int = 30, *, pairwise=None,
                   backend: str = "auto") -> BudgetResult:
    """Lagrangian width search under a resource budget (AOWS), batched over platforms.

    Seeks ``min_c cost(c)`` s.t. ``resource(c) = sum_l resource_pairwise[l, c_l, c_{l+1}] <= budget``
    through the Lagrangian dual: for ``gamma >= 0`` the min-sum path ``c(gamma)`` of
    ``cost + gamma * resource`` uses less resource as ``gamma`` grows. The search returns
    the path at the smallest ``gamma`` (found by doubling, then ``max_iter`` bisection
    steps) whose path meets the budget; that path is the cheapest among all paths using
    at most its own resource (it may leave a duality gap to the budget).

    Args:
        unary: ``[L, K]`` or ``[P, L, K]`` costs (e.g. accuracy proxies), ``+inf`` forbidden.
        resource_pairwise: ``[L-1, K, K]`` or ``[P, L-1, K, K]`` resource (latency, FLOPs) of
            consecutive choices, ``>= 0``; ``+inf`` forbids a pair.
        budget: a number, or one per platform (``[P]``).
        max_iter: bisection steps.
        pairwise: optional pairwise costs, shaped like ``resource_pairwise``.
        backend: ``"auto"``, ``"cpp"`` or ``"torch"`` (slower fallback, a Python loop).

    Returns:
        :class:`BudgetResult` ``(path, cost, resource, gamma)``.

    Raises:
        ValueError: when even the least-resource path exceeds the budget (the message gives
            that least resource), or when every path is forbidden.
    """
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    u, r, batched, to_np = _chain_args(unary, resource_pairwise, "resource_pairwise")
    c = None
    if pairwise is not None:
        _, c, _, _ = _chain_args(unary, pairwise)
        c = c.to(u.dtype)
    P = u.shape[0]
    b = torch.as_tensor(budget.copy() if isinstance(budget, np.ndarray) else budget, dtype=u.dtype)
    if b.dim() == 0:
        b = b.expand(P)
    if tuple(b.shape) != (P,):
        raise ValueError(f"budget must be a number or have shape ({P},), got {tuple(b.shape)}")
    b = b.contiguous()
    if _backend(backend, "viterbi_budget", u, r, c) == "cpp":
        path, cost, used, gamma, status = torch.ops.slimkern.viterbi_budget(u, c, r, b.to(u.device), max_iter)
    else:
        _check_chain_values(u, r, "resource_pairwise")
        if c is not None:
            _check_costs(c, "pairwise")
        _check_costs(b, "budget")
        if (r < 0).any():
            raise ValueError(f"resource_pairwise must be >= 0 (+inf forbids a pair), got {float(r.min()):.6g}")
        path, cost, used, gamma, status = _budget_torch(u, c, r, b, max_iter)
    for k, st in enumerate(status.tolist()):
        if st == _OK:
            continue
        where = f" (platform {k})" if batched else ""
        if st == _NO_PATH:
            raise ValueError(f"viterbi_budget: every path is forbidden (+inf){where}")
        if st == _INFEASIBLE:
            raise ValueError(
                f"viterbi_budget: budget {float(b[k]):.6g} is infeasible{where}: even the "
                f"least-resource path uses {float(used[k]):.6g}")
    if not batched:
        path, cost, used, gamma = path[0], cost[0], used[0], gamma[0]
    return BudgetResult(*(_out(t, to_np) for t in (path, cost, used, gamma)))


# --------------------------------------------------------------------------- Sinkhorn

_STATUS_CONVERGED, _STATUS_MAX_ITER, _STATUS_NUMERICAL = 0, 1, 2


def _record_check(e, it, tol, active, err, status, n_iter) -> None:
    """A check of the Sinkhorn loop, in place: the problems still running record their marginal
    error ``e``; those within ``tol`` stop, converged at iteration ``it``."""
    err[active] = e[active]
    done = active & (e <= tol)
    status[done] = _STATUS_CONVERGED
    n_iter[done] = it
    active &= ~done


def _sinkhorn_torch(a, b, M, reg, method, max_iter, tol, check_every, lu0, lv0):
    """Batched pure-torch Sinkhorn with the same iteration, checks and outputs as the C++ op.

    method="log" iterates the potentials with log-sum-exp (n*m exponentials per
    half-step, like POT's sinkhorn_log); "standard" is the plain scaling iteration.
    """
    f64 = torch.float64
    a, b, M = a.to(f64), b.to(f64), M.to(f64)
    B, n, m = M.shape
    live_a, live_b = a > 0, b > 0
    status = torch.full((B,), _STATUS_MAX_ITER, dtype=torch.long, device=a.device)
    n_iter = torch.full((B,), max_iter, dtype=torch.long, device=a.device)
    err = torch.zeros(B, dtype=f64, device=a.device)
    active = torch.ones(B, dtype=torch.bool, device=a.device)
    Mr = M / reg
    if method == "log":
        loga, logb = torch.log(a), torch.log(b)
        if lu0 is None:
            # The C++ core's start: every kernel exponent <= 0, a 0 in each row and column.
            lu = torch.where(live_b[:, None, :], Mr, math.inf).amin(2)
            lv = torch.where(live_a[:, :, None], Mr - lu[:, :, None], math.inf).amin(1)
        else:
            lu, lv = lu0.to(f64).clone(), lv0.to(f64).clone()
        lu = torch.where(live_a, lu, -math.inf)
        lv = torch.where(live_b, lv, -math.inf)
        col = torch.logsumexp(lu[:, :, None] - Mr, dim=1)  # log of K^T u
        for it in range(max_iter + 1):
            if it == max_iter or it % check_every == 0:
                _record_check((torch.exp(col + lv) - b).abs().sum(1), it, tol, active, err, status, n_iter)
                if it == max_iter or not active.any():
                    break
            lv = torch.where(active[:, None], logb - col, lv)
            lu = torch.where(active[:, None], loga - torch.logsumexp(lv[:, None, :] - Mr, dim=2), lu)
            col = torch.logsumexp(lu[:, :, None] - Mr, dim=1)
        plan = torch.exp(lu[:, :, None] + lv[:, None, :] - Mr)
        return plan, lu, lv, err, n_iter, status
    K = torch.exp(-Mr)
    zero = torch.zeros((), dtype=f64, device=a.device)
    u = torch.where(live_a, torch.exp(lu0.to(f64)) if lu0 is not None else torch.ones_like(a), zero)
    v = torch.where(live_b, torch.exp(lv0.to(f64)) if lv0 is not None else torch.ones_like(b), zero)
    s = torch.einsum("bij,bi->bj", K, u)
    for it in range(max_iter + 1):
        if it == max_iter or it % check_every == 0:
            _record_check((v * s - b).abs().sum(1), it, tol, active, err, status, n_iter)
            if it == max_iter or not active.any():
                break
        v_new = torch.where(live_b, b / s, zero)
        t = torch.einsum("bij,bj->bi", K, v_new)
        u_new = torch.where(live_a, a / t, zero)
        bad = (live_b & ~(s > 0)).any(1) | ~torch.isfinite(v_new).all(1) | (live_a & ~(t > 0)).any(1) \
            | ~torch.isfinite(u_new).all(1)
        broke = active & bad
        status[broke] = _STATUS_NUMERICAL
        n_iter[broke] = it
        err = torch.where(broke, (v * s - b).abs().sum(1), err)
        active &= ~bad
        u = torch.where(active[:, None], u_new, u)
        v = torch.where(active[:, None], v_new, v)
        s = torch.einsum("bij,bi->bj", K, u)
        if not active.any():
            break
    plan = u[:, :, None] * K * v[:, None, :]
    return plan, torch.log(u), torch.log(v), err, n_iter, status


def sinkhorn(a, b, M, reg: float, method: str = "log", max_iter: int = 1000, tol: float = 1e-9,
             warm_start=None, return_info: bool = False, *, check_every: int = 1,
             backend: str = "auto"):
    """Entropic optimal transport plan (Sinkhorn-Knopp).

    Solves ``min_P <P, M> - reg * H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``, ``P >= 0``
    (Cuturi 2013). The solution is ``P_ij = exp(log_u_i - M_ij / reg + log_v_j)``; each
    iteration sets ``log_v = log b - LSE_i(log_u_i - M_ij / reg)`` then
    ``log_u = log a - LSE_j(log_v_j - M_ij / reg)``, so rows match ``a`` exactly and
    convergence is measured by ``err = ||P^T 1 - b||_1``.

    Which method:
        * ``"log"`` (default): log-domain stabilised. The C++ solver uses Schmitzer's
          absorption scheme (SIAM J. Sci. Comput. 2019): scalings multiply a kernel
          ``exp(f_i + g_j - M_ij / reg)`` whose potentials absorb them when they leave
          ``[1e-50, 1e50]``, and a row or column whose kernel underflows is updated exactly
          by log-sum-exp. Same fixed point and iterates as POT's ``sinkhorn_log``, with
          matrix-vector products instead of ``n*m`` exponentials per step. Stays finite
          for ``reg`` down to 1e-4 on costs scaled to ``[0, 1]`` (convergence then needs
          many iterations, as for any Sinkhorn).
        * ``"standard"``: the plain scaling iteration with ``K = exp(-M / reg)``. Fine for
          ``reg`` >~ max(M) / 700; below, ``K`` underflows: a RuntimeWarning says so and
          the last finite iterate is returned.

    Args:
        a: ``[n]`` or ``[B, n]`` nonnegative source histogram(s); b: ``[m]`` or ``[B, m]``,
            the same total mass per problem. Zero entries are allowed (their rows/columns
            of the plan are 0).
        M: ``[n, m]`` or ``[B, n, m]`` finite costs.
        reg: entropic regularisation ``> 0``.
        max_iter: iterations at most. tol: stop when ``err <= tol`` (``tol = 0`` runs
            ``max_iter`` iterations).
        warm_start: ``(log_u, log_v)`` shaped like ``a`` and ``b`` (POT's convention: the
            ``info["log_u"], info["log_v"]`` of an earlier call).
        return_info: also return a dict with ``n_iter`` (iterations performed), ``err``
            (marginal violation of the returned plan), ``converged``, ``log_u``, ``log_v``,
            ``method``, ``check_every``, ``backend``.
        check_every: test ``err <= tol`` every k iterations (the C++ solver gets ``err`` for
            free from its fused pass, so 1 costs nothing there).
        backend: ``"auto"``, ``"cpp"`` or ``"torch"`` (pure torch, slower; any device).

    Returns:
        The plan ``[n, m]`` (``[B, n, m]``), or ``(plan, info)``. numpy inputs give numpy.

    Warns:
        RuntimeWarning when ``err > tol`` after ``max_iter`` iterations (with the reached
        error), and when the standard method under/overflows.

    Raises:
        ValueError on NaN/inf in ``a``, ``b`` or ``M``, negative entries or zero total mass
        in a histogram, unequal masses, mismatched shapes or a bad ``reg``/``method``.
    """
    at, an = _as_tensor(a, "a")
    bt, bn = _as_tensor(b, "b")
    Mt, mn = _as_tensor(M, "M")
    to_np = an or bn or mn
    if method not in ("log", "standard"):
        raise ValueError(f"method must be 'log' or 'standard', got {method!r}")
    # bool is an int to Python: reg=True would run with reg = 1.
    if not (isinstance(reg, (int, float)) and not isinstance(reg, bool) and math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a finite number > 0, got {reg!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and not math.isnan(tol)):
        raise ValueError(f"tol must be a number, got {tol!r}")
    batched = Mt.dim() == 3
    if Mt.dim() not in (2, 3) or at.dim() != Mt.dim() - 1 or bt.dim() != Mt.dim() - 1:
        raise ValueError(f"expected a [n], b [m], M [n, m] (or with a batch axis B), got shapes "
                         f"{tuple(at.shape)}, {tuple(bt.shape)}, {tuple(Mt.shape)}")
    if not batched:
        at, bt, Mt = at[None], bt[None], Mt[None]
    B, n, m = Mt.shape
    if tuple(at.shape) != (B, n) or tuple(bt.shape) != (B, m):
        lead = (B,) if batched else ()
        raise ValueError(f"shape mismatch: M has shape {tuple(Mt.shape[1 - batched:])}, so a must be "
                         f"{lead + (n,)} and b {lead + (m,)}; got a {tuple(at.shape[1 - batched:])} "
                         f"and b {tuple(bt.shape[1 - batched:])}")
    if n == 0 or m == 0:
        raise ValueError("a and b must not be empty")
    if not (at.device == bt.device == Mt.device):
        raise ValueError(f"a, b and M must be on the same device, got {at.device}, {bt.device}, {Mt.device}")
    chosen = _backend(backend, "sinkhorn", at, bt, Mt)
    # The C++ op checks M itself (same message) in its pass over the float64 copy.
    for t, name in ((at, "a"), (bt, "b"), (Mt, "M")) if chosen == "torch" else ((at, "a"), (bt, "b")):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    for t, name in ((at, "a"), (bt, "b")):
        if (t < 0).any():
            raise ValueError(f"{name} must be nonnegative, got {float(t.min()):.6g}")
    sa, sb = at.sum(1, dtype=torch.float64), bt.sum(1, dtype=torch.float64)
    for s, name in ((sa, "a"), (sb, "b")):
        if (s <= 0).any():
            raise ValueError(f"{name} has zero total mass")
    rel = 1e-5 if torch.float32 in (at.dtype, bt.dtype) else 1e-9
    bad = ((sa - sb).abs() > rel * torch.maximum(sa, sb)).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(f"a and b must have the same total mass (balanced OT): sum(a) = {float(sa[k]):.9g}, "
                         f"sum(b) = {float(sb[k]):.9g}; normalise them")
    dtype = torch.promote_types(torch.promote_types(at.dtype, bt.dtype), Mt.dtype)
    at, bt, Mt = at.to(dtype), bt.to(dtype), Mt.to(dtype)
    lu0 = lv0 = None
    if warm_start is not None:
        if not (isinstance(warm_start, (tuple, list)) and len(warm_start) == 2):
            raise ValueError("warm_start must be a pair (log_u, log_v)")
        lu0, _ = _as_tensor(warm_start[0], "warm_start[0] (log_u)")
        lv0, _ = _as_tensor(warm_start[1], "warm_start[1] (log_v)")
        if not batched:
            lu0, lv0 = lu0[None], lv0[None]
        if tuple(lu0.shape) != (B, n) or tuple(lv0.shape) != (B, m):
            raise ValueError(f"warm_start shapes {tuple(warm_start[0].shape)}, {tuple(warm_start[1].shape)} "
                             f"must match a and b")
        lu0, lv0 = lu0.to(dtype=dtype, device=at.device), lv0.to(dtype=dtype, device=at.device)
        if not (torch.isfinite(lu0) | (at == 0)).all() or not (torch.isfinite(lv0) | (bt == 0)).all():
            raise ValueError("warm_start log_u / log_v must be finite where a / b > 0")
    if chosen == "cpp":
        plan, lu, lv, err, n_iter, status = torch.ops.slimkern.sinkhorn(
            at, bt, Mt, float(reg), method, max_iter, float(tol), check_every, lu0, lv0)
    else:
        plan, lu, lv, err, n_iter, status = _sinkhorn_torch(
            at, bt, Mt, float(reg), method, max_iter, float(tol), check_every, lu0, lv0)
        plan, lu, lv = plan.to(dtype), lu.to(dtype), lv.to(dtype)
    _warn_status(status, err, n_iter, tol, reg, method, batched)
    if not batched:
        plan, lu, lv = plan[0], lu[0], lv[0]
    plan = _out(plan, to_np)
    if not return_info:
        return plan
    info = {
        "n_iter": n_iter if batched else int(n_iter[0]),
        "err": err if batched else float(err[0]),
        "converged": (status == _STATUS_CONVERGED) if batched else bool(status[0] == _STATUS_CONVERGED),
        "log_u": _out(lu, to_np),
        "log_v": _out(lv, to_np),
        "method": method,
        "check_every": check_every,
        "backend": chosen,
    }
    if batched and to_np:
        info.update(n_iter=n_iter.numpy(), err=err.numpy(), converged=info["converged"].numpy())
    return plan, info


def _warn_status(status, err, n_iter, tol, reg, method, batched):
    def which(mask):
        idx = mask.nonzero().flatten().tolist()
        return f" (problems {idx[:10]}{'...' if len(idx) > 10 else ''} of {status.numel()})" if batched else ""

    broke = status == _STATUS_NUMERICAL
    if broke.any():
        k = int(broke.nonzero()[0])
        warnings.warn(
            f"sinkhorn(method='standard'): numerical under/overflow at iteration {int(n_iter[k])}: "
            f"reg={reg:g} is too small for the plain scaling iteration; returning the last finite "
            f"iterate (marginal error {float(err[k]):.3e}). Use method='log'{which(broke)}",
            RuntimeWarning, stacklevel=3)
    late = status == _STATUS_MAX_ITER
    if late.any():
        k = int(late.nonzero()[0])
        warnings.warn(
            f"sinkhorn did not converge in {int(n_iter[k])} iterations: marginal error "
            f"{float(err[late].max()):.3e} > tol {tol:.1e}{which(late)}; raise max_iter or reg",
            RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- fake kernels

def _register_fakes():
    """Shapes for torch.compile / FakeTensor tracing of the ops (no data-dependent shapes)."""
    if has_op("viterbi"):
        @torch.library.register_fake("slimkern::viterbi")
        def _(unary, pairwise):
            P, L, _ = unary.shape
            return unary.new_empty((P, L), dtype=torch.long), unary.new_empty((P,))

        @torch.library.register_fake("slimkern::viterbi_marginals")
        def _(unary, pairwise, temperature):
            return torch.empty_like(unary), unary.new_empty((unary.shape[0],))

        @torch.library.register_fake("slimkern::viterbi_budget")
        def _(unary, pairwise, resource, budget, max_iter):
            P, L, _ = unary.shape
            vec = unary.new_empty((P,))
            return (unary.new_empty((P, L), dtype=torch.long), vec, torch.empty_like(vec),
                    torch.empty_like(vec), unary.new_empty((P,), dtype=torch.long))
    if has_op("sinkhorn"):
        @torch.library.register_fake("slimkern::sinkhorn")
        def _(a, b, M, reg, method, max_iter, tol, check_every, log_u0, log_v0):
            B = a.shape[0]
            return (torch.empty_like(M), torch.empty_like(a), torch.empty_like(b),
                    a.new_empty((B,), dtype=torch.float64), a.new_empty((B,), dtype=torch.long),
                    a.new_empty((B,), dtype=torch.long))


_register_fakes()
