"""Budget-clustered FedAvg: one model per budget group."""
from __future__ import annotations

from typing import Callable, Hashable, Mapping

import torch

from slimkern.fl.aggregate import ClientUpdate
from slimkern.fl.rules.base import Rule
from slimkern.fl.rules.fedavg import FedAvg

__all__ = ["Clustered"]


class Clustered(Rule):
    """One model per budget group, FedAvg inside each (the DAC paper's clustering baseline)."""
    name = "clustered"
    grouped = True

    @staticmethod
    def combine(params_by_group: Mapping[Hashable, Mapping[str, torch.Tensor]], updates, windows,
                assigned=None, log=None, group_of: Callable[[ClientUpdate], Hashable] | None = None):
        """Budget-clustered FedAvg (the clustering baseline of the DAC paper; cf. Briggs et al.
        2020, "Federated learning with hierarchical clustering of local updates"): clients are
        grouped by budget (by default by their switch), every group owns a separate copy of
        the parameters, and FedAvg runs inside each group on that group's architecture.
        Returns ``({group: params}, {group: report})``; a group nobody updated is unchanged.
        An update whose group has no parameters (or whose group cannot be told) is rejected; it
        is listed in the first group's report."""
        group_of = group_of or (lambda u: u.switch)
        by_group: dict[Hashable, list[ClientUpdate]] = {}
        stray: list[tuple[int, str]] = []
        for u in updates:
            try:
                g = group_of(u)
                known = g in params_by_group
            except Exception as exc:  # noqa: BLE001 - a bad update never stops the round
                g, known = None, False
                why = f"its group cannot be told: {type(exc).__name__}: {exc}"
            else:
                why = f"no model for its group {g}"
            if known:
                by_group.setdefault(g, []).append(u)
            else:
                stray.append((u.client, why))
                if log is not None:
                    log(f"rejected update of client {u.client}: {why}")
        out, reports = {}, {}
        for g, p in params_by_group.items():
            new, rep = FedAvg.combine(p, by_group.get(g, []), windows, assigned, log)
            if stray:
                rep.rejected[:0], stray = stray, []
            out[g], reports[g] = new, rep
        return out, reports

    def group(self, assigned):
        return assigned

    def aggregate(self, agg, params, updates, assigned, log):
        """FedAvg inside one group (the server calls this once per group)."""
        return FedAvg.combine(params, updates, agg, assigned=assigned, log=log)
