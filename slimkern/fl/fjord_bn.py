"""FjORD's per-width BN statistics, travelling between server and clients (``FjORD(bn="travel")``).

Flower's ``baselines/fjord`` (flwr 1.5) keeps, in every ``ODBatchNorm2d``, one non-affine
``BatchNorm2d`` per width ``p`` (its running mean and variance) next to a shared, sliced
affine. Those statistics are part of the state dict, so they travel: a client receives the
server's statistics of every width, updates the widths it samples during local training,
and returns all of them; the server (``strategy.fjord_average``, the ``layer_p`` branch)
averages the statistics of width ``p`` over the clients with ``p_max >= p``, weighted by
their example counts,

    mu_p = sum_{k: p_max_k >= p} n_k mu_p^k / sum_{k: p_max_k >= p} n_k     (same for var),

and keeps the previous value when no such client returned.

In slimkern a width's statistics are the row of ``Switch.width(p)`` in every switchable BN
(``[S, C_full]`` buffers). With ``bn="travel"`` the simulation loads the server's rows
into the client's copy before local training (a width the server has no statistics for yet
starts fresh: mean 0, var 1), the client returns the rows of every width ``p <= p_max`` in
``ClientUpdate.stats``, the server averages them as above and evaluates with them instead
of recalibrating on server data (the default ``bn="server"``, HeteroFL's static BN).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["read_rows", "load_rows", "average", "load_for_eval", "to_checkpoint", "from_checkpoint",
           "row_shapes"]

Rows = dict  # switch -> {bn module name: (running_mean row, running_var row)}


def _bns(net):
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    return [(n, m) for n, m in net.named_modules() if isinstance(m, _SwitchableBatchNorm)]


def read_rows(net, switches: Sequence) -> Rows:
    """The running statistics of ``switches`` in every switchable BN of ``net`` (copies);
    a switch without a row in some BN is skipped there."""
    out: Rows = {}
    for sw in switches:
        rows = {}
        for name, m in _bns(net):
            r = m.switch_row(sw)
            if r is not None:
                rows[name] = (m.running_mean[r].detach().clone(), m.running_var[r].detach().clone())
        if rows:
            out[sw] = rows
    return out


def load_rows(net, rows: Mapping, switches: Sequence | None = None, fresh_missing: bool = False) -> None:
    """Writes ``rows`` (``read_rows`` format) into ``net``'s BN rows, registering a switch
    where needed; ``switches`` limits which ones (default: all in ``rows``). With
    ``fresh_missing`` a switch of ``switches`` that ``rows`` lacks gets a fresh row (mean 0,
    var 1), as a client receiving no statistics for that width starts."""
    with torch.no_grad():
        for sw in (list(rows) if switches is None else list(switches)):
            per = rows.get(sw)
            for name, m in _bns(net):
                if per is None or name not in per:
                    if fresh_missing:
                        m.register_switch(sw)
                        m.reset_switch_stats(sw)
                    continue
                r = m.register_switch(sw)
                mean, var = per[name]
                m.running_mean[r].copy_(mean)
                m.running_var[r].copy_(var)
                m.num_batches_tracked[r] = max(int(m.num_batches_tracked[r]), 1)


def load_for_eval(net, rows: Mapping, switches: Sequence) -> list:
    """Loads the travelled statistics of ``switches`` into ``net``; returns the switches
    that have none (to be calibrated on server data)."""
    have = [s for s in switches if s in rows]
    load_rows(net, rows, have)
    return [s for s in switches if s not in rows]


def row_shapes(net) -> dict[str, int]:
    """``bn module name -> C_full``: the shape check of a client's rows."""
    return {n: m.num_full for n, m in _bns(net)}


def _rows_ok(rows, shapes) -> bool:
    try:
        for per in rows.values():
            for name, (mean, var) in per.items():
                c = shapes.get(name)
                for t in (mean, var):
                    if c is None or not isinstance(t, torch.Tensor) or tuple(t.shape) != (c,) \
                            or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                        return False
                if bool((var < 0).any()):
                    return False
        return True
    except (TypeError, ValueError, AttributeError):
        return False


def to_checkpoint(rows: Mapping) -> dict:
    """Plain-typed (``weights_only`` loadable): switch notation -> name -> [mean, var]."""
    return {str(sw): {n: [m, v] for n, (m, v) in per.items()} for sw, per in rows.items()}


def from_checkpoint(d: Mapping) -> Rows:
    from slimkern.switch import Switch
    return {Switch.parse(k): {n: (mv[0], mv[1]) for n, mv in per.items()} for k, per in (d or {}).items()}


def average(previous: Mapping, returned: Sequence[tuple[float, float, Mapping]], widths: Sequence[float],
            shapes: Mapping[str, int] | None = None) -> Rows:
    """FjORD's ``layer_p`` average: ``returned`` is ``(p_max, n_k, rows)`` per accepted client;
    for every width ``p`` the rows of the clients with ``p_max >= p`` are averaged weighted by
    ``n_k``; a width nobody returned keeps its ``previous`` rows. With ``shapes``
    (``row_shapes``) a client whose rows are malformed (shape, dtype, NaN/inf, negative
    variance) is left out of the statistics average."""
    from slimkern.switch import Switch
    if shapes is not None:
        returned = [x for x in returned if isinstance(x[2], Mapping) and _rows_ok(x[2], shapes)]
    out: Rows = {sw: dict(per) for sw, per in previous.items()}
    for p in widths:
        sw = Switch.width(p)
        held = [(n, rows[sw]) for pmax, n, rows in returned if pmax >= p - 1e-9 and sw in rows]
        if not held:
            continue
        names = set.intersection(*(set(r) for _, r in held))
        tot = float(sum(n for n, _ in held))
        new = {}
        for name in sorted(names):
            mean = sum(n * r[name][0].double() for n, r in held) / tot
            var = sum(n * r[name][1].double() for n, r in held) / tot
            new[name] = (mean.to(held[0][1][name][0].dtype), var.to(held[0][1][name][1].dtype))
        out[sw] = new
    return out
