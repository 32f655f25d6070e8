"""OT-aligned aggregation: every client's sub-network aligned to the global model by optimal
transport, then averaged in the global basis, widths included."""
from __future__ import annotations

import contextlib
import math
import time

import torch

from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import AggregationReport, ClientUpdate, UpdateRejected, average
from slimkern.fl.rules.base import Rule, check_weighting

__all__ = ["OTFusion"]


class OTFusion(Rule):
    """Clients train the prefix sub-network ``[p]`` of their per-device width (as HeteroFL's
    do, without its label split / Scaler); the server fuses the replies by optimal transport
    (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020;
    ``slimkern.fl.ot_fusion``) instead of averaging entry by entry.

    ``combine``: client ``k``'s sub-network (``p_k C_g`` neurons in width group ``g``) is
    aligned to the current global model (``C_g`` neurons) group by group with the plan
    ``T_k [p_k C_g, C_g]`` of ``ot.emd`` (``method="emd"``) or Sinkhorn, weights ground metric
    (rows aligned on their input side first; one plan per residual group):
    ``W'_k = C_out^T W_k R_in`` (``slimkern.fl.ot_fusion.align_state``), so a narrow client's
    neurons are split over the global neurons they match -- a rectangular plan. The new
    global model is ``W = sum_k w_k W'_k / sum_k w_k`` over every element (``w_k = n_k``,
    ``weighting="samples"``; ``"clients"``: 1). BN affine moves with its channels; running
    statistics never travel (the server recalibrates them).

    ``mode="prefix"``: each reply is aligned instead to the global model's *own* prefix of the
    same width (square plans: a permutation of the client's neurons within its sub-network),
    written back into its windows and averaged element-wise over the clients holding each
    element (HeteroFL's formula, ``slimkern.fl.aggregate.average``): alignment without splitting.

    The rule needs the model's width groups: pass ``model=net`` (or it learns them from the
    first client's working copy when clients run in the server's process, as in
    ``simulate``). The server's time in ``combine`` is kept in ``seconds`` (per round).
    """
    name = "otfusion"

    def __init__(self, *, method: str = "emd", reg: float = 0.01, weighting: str = "samples",
                 mode: str = "full", clip_norm: float | None = None, model=None):
        if method not in ("emd", "sinkhorn"):
            raise ValueError(f"otfusion: method must be 'emd' or 'sinkhorn', got {method!r}")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 < reg < math.inf:
            raise ValueError(f"otfusion: reg must be a positive number, got {reg!r}")
        check_weighting(weighting)
        if mode not in ("full", "prefix"):
            raise ValueError(f"otfusion: mode must be 'full' (rectangular, into the whole model) or 'prefix', "
                             f"got {mode!r}")
        self.method, self.reg, self.weighting, self.clip_norm = method, float(reg), weighting, clip_norm
        self.mode = mode
        self._table = None
        self._seconds: list[float] = []
        if model is not None:
            self._learn(model)

    @property
    def seconds(self) -> list[float]:
        """Server seconds spent in each ``aggregate`` call."""
        return list(self._seconds)

    def _learn(self, net) -> None:
        from slimkern.fl.ot_graph import layer_table
        self._table = layer_table(net)

    def local_context(self, net, switch):
        if self._table is None:  # in process: the client's working copy is the server's architecture
            self._learn(net)
        return contextlib.nullcontext()

    def aggregate(self, agg, params: dict, updates, assigned, log):
        t0 = time.perf_counter()
        try:
            return self._fuse(agg, params, updates, assigned, log)
        finally:
            self._seconds.append(time.perf_counter() - t0)

    def _fuse(self, agg, params, updates, assigned, log):
        from slimkern.fl.ot_fusion import align_state, solve_plans

        if self._table is None:
            raise ValueError("otfusion: the rule does not know the model's width groups; build it as "
                             "OTFusion(model=net)")
        report = AggregationReport()
        updates, report.rejected = _validate.reject_where(
            updates, lambda u: _validate.prefix_problem(u.switch, "otfusion"), log)
        old = agg.flatten(params)
        anchor = {L.name: {k: params[f"{L.name}.{k}"].detach() for k in ("weight", "bias")
                           if f"{L.name}.{k}" in params} for L in self._table}
        total: dict[str, torch.Tensor] = {}
        wsum, seen, prefix_updates = 0.0, set(), []
        for u in updates:
            why = agg.check(u, assigned)
            if why is None and u.client in seen:
                why = f"client {u.client} sent more than one update"
            try:
                lay = agg.layout(u.switch) if why is None else None
                vals = None
                if lay is not None:
                    vals = u.values if isinstance(u.values, torch.Tensor) else lay.pack(u.values)
                    if vals.dim() != 1 or vals.numel() != lay.numel:
                        why = f"{vals.numel()} values sent, the switch {u.switch} has {lay.numel}"
                    elif not vals.is_floating_point() or not bool(torch.isfinite(vals).all()):
                        why = "values must be finite floating point numbers"
            except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
                why = str(exc)
            if why is not None:
                report.rejected.append((u.client, why))
                if log is not None:
                    log(f"rejected update of client {u.client}: {why}")
                continue
            seen.add(u.client)
            flat = old.clone()
            flat[lay.index] = vals.to(flat.dtype)
            full = agg.unflatten(flat)
            wins = {name: win for name, win, _, _ in lay.pieces}
            sub = {L.name: {k: full[f"{L.name}.{k}"][wins[f"{L.name}.{k}"]] for k in ("weight", "bias")
                            if f"{L.name}.{k}" in wins} for L in self._table}
            if self.mode == "prefix":  # square plans against the global's own sub-network
                ref = {L.name: {k: params[f"{L.name}.{k}"].detach()[wins[f"{L.name}.{k}"]] for k in ("weight", "bias")
                                if f"{L.name}.{k}" in wins} for L in self._table}
                aligned = align_state(sub, solve_plans(sub, ref, self._table, method=self.method, reg=self.reg),
                                      self._table)
                for L in self._table:
                    for k, t in aligned[L.name].items():
                        if isinstance(t, torch.Tensor):
                            full[f"{L.name}.{k}"][wins[f"{L.name}.{k}"]] = t
                prefix_updates.append(ClientUpdate(u.client, u.switch, agg.extract(full, u.switch), u.num_samples))
                continue
            plans = solve_plans(sub, anchor, self._table, method=self.method, reg=self.reg)
            aligned = align_state(sub, plans, self._table)
            w = float(u.num_samples) if self.weighting == "samples" else 1.0
            for L in self._table:
                for k, t in aligned[L.name].items():
                    key = f"{L.name}.{k}"
                    if key in params and isinstance(t, torch.Tensor):
                        total[key] = total.get(key, 0) + w * t.double()
            wsum += w
            report.accepted.append(u.client)
        if self.mode == "prefix":
            new, rep = average(params, prefix_updates, agg, assigned, log, report.rejected, self.weighting)
            return new, rep
        new = {n: p.detach().clone() for n, p in params.items()}
        if report.accepted:
            for key, t in total.items():
                new[key] = (t / wsum).to(params[key].dtype)
                report.updated_elements += t.numel()
        elif log is not None:
            log(report.summary())
        return new, report
