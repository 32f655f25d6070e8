"""Checks that keep one bad client from stopping a federated run (issue 13, point 2).

The server never raises because of what a client sent: every per-update problem becomes a
rejection with a reason (``AggregationReport.rejected`` / ``RoundRecord.rejected``), and
the aggregate itself is checked, not only each update. The pieces:

* ``sample_count_problem``: a sample count must be a real number (Python or NumPy
  integer/float, or a one-element tensor), finite, positive, at most a bound
  (``MAX_NUM_SAMPLES`` = 1e12 by default: a count of 1e39 is absurd, and would overflow the
  float32 weight sums) and, when the server knows it, at most the client's assigned count.
* ``one_switch``: rules that average one architecture (``fedavg``) reject the updates whose
  switch is not the round's switch (the one the server assigned, or else the most common
  one) instead of refusing the whole round.
* ``prefix_problem``: rules of nested prefix sub-networks (``heterofl``, ``fjord``) reject a
  non-prefix switch.
* ``screen``: the server-side checks before a rule's own: the reply is a ``ClientUpdate`` of
  the client that sent it, its sample count is sane and within the client's assignment,
  and (optionally) its change is clipped.
* ``clip_update``: optional norm clipping of the update ``delta = w_k - w`` (the elements the
  client trained, minus the server's values; flat, sliced or masked updates): ``delta <- delta * min(1, c / ||delta||_2)``,
  the clipping step of DP-FedAvg (McMahan et al. 2018, "Learning differentially private
  recurrent language models", Alg. 1) and the norm-bounding defence of Sun et al. 2019
  ("Can you really backdoor federated learning?").
* ``overflowed``: called by ``Aggregator.aggregate`` when the weighted mean is not finite
  although every update was (two finite float32 updates of 3e38 sum to inf): the mean is
  recomputed with float64 sums; if that is not finite either, the round's updates are
  rejected and the model is left unchanged.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Hashable, Mapping, Sequence

import torch

__all__ = ["MAX_NUM_SAMPLES", "ClientFailure", "failure_reason", "as_count", "sample_count_problem",
           "one_switch", "prefix_problem", "reject_where", "screen", "clip_update", "overflowed"]

MAX_NUM_SAMPLES = 1e12


class ClientFailure(RuntimeError):
    """A client's local training cannot go on (e.g. its loss is not finite)."""


def failure_reason(exc: BaseException) -> str:
    """One line saying why a client's local training failed (the round goes on without it)."""
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"local training failed: {type(exc).__name__}: {msg}" if msg else \
        f"local training failed: {type(exc).__name__}"


def as_count(n) -> float | None:
    """``n`` as a float when it is a real number (bool excluded), else None."""
    if isinstance(n, bool):
        return None
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype == torch.bool or n.is_complex():
            return None
        return float(n.item())
    if isinstance(n, numbers.Real):  # int, float, numpy integers and floats
        try:
            return float(n)
        except (OverflowError, ValueError):
            return math.inf
    return None


def sample_count_problem(n, bound: float | None = MAX_NUM_SAMPLES, assigned: float | None = None) -> str | None:
    """Why ``n`` is not an acceptable sample count, or None (module docstring)."""
    v = as_count(n)
    if v is None or not math.isfinite(v) or v <= 0:
        return f"num_samples must be a positive finite number, got {n!r}"
    if bound is not None and v > bound:
        return f"num_samples {v:.6g} is above the bound {bound:.6g}"
    if assigned is not None and v > assigned:
        return f"num_samples {v:.6g} is above the {assigned:.6g} samples the server assigned to this client"
    return None


def _log_rejection(log, client, why) -> None:
    if log is not None:
        log(f"rejected update of client {client}: {why}")


def reject_where(updates: Sequence, problem: Callable, log=None) -> tuple[list, list[tuple[int, str]]]:
    """Splits ``updates`` into those ``problem(u)`` has nothing against and rejections
    ``(client, reason)`` (each logged as the aggregator logs its own)."""
    kept, rejected = [], []
    for u in updates:
        why = problem(u)
        if why is None:
            kept.append(u)
        else:
            rejected.append((u.client, why))
            _log_rejection(log, u.client, why)
    return kept, rejected


def one_switch(updates: Sequence, assigned: Mapping | None, rule: str, log=None):
    """``(kept, rejected)``: the updates of the round's one switch, the others rejected.

    The round's switch is the one the server assigned (when ``assigned`` names one switch
    for the clients that sent updates), else the most common switch among the updates
    (ties: the first seen). Updates whose switch differs from their own assignment are left
    to the aggregator, which rejects them naming the assignment.
    """
    def own(u):
        return assigned is None or (u.client in assigned and assigned[u.client] == u.switch)

    counts: dict[Hashable, int] = {}
    for u in updates:
        if own(u):
            try:
                counts[u.switch] = counts.get(u.switch, 0) + 1
            except TypeError:  # unhashable switch: the aggregator rejects it
                pass
    if len(counts) <= 1:
        return list(updates), []
    ref = max(counts, key=lambda s: counts[s])  # max keeps the first of equal counts
    return reject_where(updates, lambda u: (
        f"{rule} averages one switch this round ({ref}); this update trained {u.switch}"
        if own(u) and u.switch != ref else None), log)


def _branches(switch):
    br = getattr(switch, "branches", None)
    if br is None:
        return None
    try:
        return [(float(a), float(b)) for a, b in br]
    except (TypeError, ValueError):
        return None


def prefix_problem(switch, rule: str) -> str | None:
    """Why ``switch`` is not a prefix sub-network ``[0, p)``, or None (None too when the
    switch does not describe its branches: then the windows decide)."""
    try:
        br = _branches(switch)
    except ValueError:  # per-layer channel switches have no fractions
        return None
    if br is not None and (len(br) != 1 or br[0][0] != 0.0):
        return f"{rule} trains prefix widths only; this update has switch {switch}"
    return None


def screen(u, agg, old_flat: torch.Tensor, assigned_samples: float | None = None,
           max_update_norm: float | None = None, client: int | None = None):
    """Server-side checks that need the server's knowledge, before the rule's own:
    ``(update, reason)`` -- reason None when the update goes on to the aggregation (with its
    change clipped to ``max_update_norm`` when given), else why it is rejected. The reply
    must be a ``ClientUpdate`` of the ``client`` that sent it; the sample count must not
    exceed ``assigned_samples`` (what the server gave the client) nor ``agg.max_num_samples``."""
    if not all(hasattr(u, a) for a in ("client", "switch", "values", "num_samples", "mask")):
        return u, f"the reply is a {type(u).__name__}, not a ClientUpdate"
    if client is not None:
        try:
            same = bool(u.client == client)
        except Exception:  # noqa: BLE001 - an id that cannot even be compared
            same = False
        if not same:
            return u, f"the reply of client {client} names client {u.client!r}"
    why = sample_count_problem(u.num_samples, getattr(agg, "max_num_samples", MAX_NUM_SAMPLES), assigned_samples)
    if why is not None:
        return u, why
    if max_update_norm is not None:
        u, _ = clip_update(agg, old_flat, u, max_update_norm)
    return u, None


def _flat_values(agg, u) -> torch.Tensor | None:
    """The flat vector of a window update (None when it cannot be laid out; the
    aggregator then rejects it with the reason)."""
    from slimkern.fl.aggregate import UpdateRejected
    try:
        lay = agg.layout(u.switch)
    except Exception:  # noqa: BLE001 - any switch the windows reject is the aggregator's to report
        return None
    if isinstance(u.values, torch.Tensor):
        ok = u.values.dim() == 1 and u.values.numel() == lay.numel and u.values.is_floating_point()
        return u.values.detach() if ok else None
    if isinstance(u.values, Mapping):
        try:
            with torch.no_grad():
                return lay.pack(u.values)
        except (UpdateRejected, RuntimeError, TypeError, ValueError):
            return None
    return None


def clip_update(agg, old_flat: torch.Tensor, u, max_norm: float):
    """``(update, norm)``: ``u`` with its change clipped to L2 norm ``max_norm`` (the
    module docstring) -- a flat-vector update, or for a masked update a masked one whose
    trained elements are clipped; ``norm`` is the change's norm before clipping (None when
    ``u`` cannot be laid out or is not finite: the aggregator rejects those). An update
    within the bound comes back unchanged."""
    from slimkern.fl.aggregate import ClientUpdate
    if u.mask is not None:
        return _clip_masked(agg, old_flat, u, max_norm)
    vec = _flat_values(agg, u)
    if vec is None:
        return u, None
    old = old_flat[agg.layout(u.switch).index].to(torch.float64)
    delta = vec.to(torch.float64) - old
    norm = float(torch.linalg.vector_norm(delta))
    if not math.isfinite(norm):
        return u, None
    if norm <= max_norm:
        return u, norm
    new = (old + delta * (max_norm / norm)).to(vec.dtype)
    return ClientUpdate(u.client, u.switch, new, u.num_samples, stats=u.stats), norm


def _clip_masked(agg, old_flat: torch.Tensor, u, max_norm: float):
    from slimkern.fl.aggregate import ClientUpdate, UpdateRejected
    try:
        vals, mask = agg._masked(u)
    except (UpdateRejected, AttributeError, TypeError, RuntimeError):
        return u, None
    old = old_flat.to(torch.float64)
    delta = torch.where(mask, vals.to(torch.float64) - old, 0.0)
    norm = float(torch.linalg.vector_norm(delta))
    if not math.isfinite(norm):
        return u, None
    if norm <= max_norm:
        return u, norm
    new = (old + delta * (max_norm / norm)).to(vals.dtype)
    values = {n: t.clone() for n, t in agg.unflatten(new).items()}
    masks = {n: t.clone() for n, t in agg.unflatten(mask).items()}
    return ClientUpdate(u.client, u.switch, values, u.num_samples, mask=masks, stats=u.stats), norm


def overflowed(agg, params, updates, assigned, log, report, acc_dtype, **kwargs):
    """What ``Aggregator.aggregate`` returns when its mean is not finite (module docstring);
    ``kwargs`` are the other arguments of that ``aggregate`` call (e.g. ``weighting``)."""
    if acc_dtype != torch.float64:
        agg._acc64 = True
        try:
            new, rep = agg.aggregate(params, updates, assigned=assigned, log=None, **kwargs)
        finally:
            agg._acc64 = False
        already = set(report.rejected)
        for c, why in rep.rejected:
            if (c, why) not in already:
                _log_rejection(log, c, why)
        return new, rep
    bad = "the aggregate is not finite (overflow in the weighted mean): every update of the round is rejected"
    for c in report.accepted:
        report.rejected.append((c, bad))
        _log_rejection(log, c, bad)
    report.accepted = []
    report.updated_elements = 0
    if log is not None:
        log(report.summary())
    return {n: params[n].detach().clone() for n in agg.shapes}, report
