"""Client budgets and the switch each client can afford.

A ``Budget`` is what one device of a client can run: at most ``macs`` multiply-adds per
sample and ``params`` parameters (either may be None = unlimited), on each of ``devices``
identical devices. A one-branch switch runs on one device, so it fits when its total cost
fits one device. A ParaDiS switch (several branches fused only at the logits, Ozerov et
al.) can be spread over the devices: it fits when its branches can be packed onto
``devices`` devices with every device's summed cost within the budget (first-fit
decreasing, exact for the usual "one branch per device" case). A household with two phones
of the 0.5x size thus trains ``[0.5, 0.5]`` while one phone trains ``[0.5]``.

``assign_switch`` returns the best fitting candidate: the largest total MACs (then params,
then fewer branches: less fusion traffic), raising a ValueError that states the cheapest
candidate's cost and the budget when none fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

__all__ = ["Budget", "Cost", "assign_switch", "fits", "profile_cost"]


@dataclass(frozen=True)
class Budget:
    macs: float | None = None
    params: float | None = None
    devices: int = 1

    def __post_init__(self):
        for name in ("macs", "params"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise ValueError(f"Budget.{name} must be a positive number or None, got {v!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"Budget.devices must be an int >= 1, got {self.devices!r}")


@dataclass(frozen=True)
class Cost:
    """Per-branch cost of a switch: ``branches[i] = (macs, params)`` of branch i."""
    branches: tuple[tuple[float, float], ...]

    @property
    def macs(self) -> float:
        return sum(m for m, _ in self.branches)

    @property
    def params(self) -> float:
        return sum(p for _, p in self.branches)


def profile_cost(net, input_size) -> Callable[[Hashable], Cost]:
    """A cost function ``switch -> Cost`` backed by ``slimkern.profile(net, sw, input_size)``."""
    import slimkern

    if not hasattr(slimkern, "profile"):
        raise RuntimeError("slimkern.profile is not available in this build; pass cost=... explicitly")

    def cost(sw) -> Cost:
        prof = slimkern.profile(net, sw, input_size=input_size)
        per = getattr(prof, "branches", None)
        if per is None and isinstance(prof, dict):
            per = prof.get("branches")
        if per is None:
            raise RuntimeError(f"slimkern.profile returned no per-branch costs: {prof!r}")
        out = []
        for b in per:
            get = b.get if isinstance(b, dict) else (lambda k, _b=b: getattr(_b, k))
            out.append((float(get("macs")), float(get("params"))))
        return Cost(tuple(out))

    return cost


def _within(macs: float, params: float, budget: Budget) -> bool:
    return ((budget.macs is None or macs <= budget.macs * (1 + 1e-9))
            and (budget.params is None or params <= budget.params * (1 + 1e-9)))


def fits(cost: Cost, budget: Budget) -> bool:
    """Whether the switch of ``cost`` runs within ``budget`` (module docstring)."""
    if _within(cost.macs, cost.params, budget):
        return True
    if len(cost.branches) == 1 or budget.devices == 1:
        return False
    bins: list[list[float]] = []
    for m, p in sorted(cost.branches, key=lambda b: (b[0], b[1]), reverse=True):
        for b in bins:
            if _within(b[0] + m, b[1] + p, budget):
                b[0] += m
                b[1] += p
                break
        else:
            if len(bins) == budget.devices or not _within(m, p, budget):
                return False
            bins.append([m, p])
    return True


def assign_switch(budget: Budget, candidates: Sequence[Hashable], cost: Callable[[Hashable], Cost],
                  distributed: bool = True):
    """The best candidate switch that fits ``budget``.

    ``cost(switch) -> Cost`` (e.g. ``profile_cost(net, (1, 3, 32, 32))``). With
    ``distributed=False`` multi-branch candidates are skipped (strategies such as HeteroFL
    know only single sub-networks).
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    if not candidates:
        raise ValueError("no candidate switches given")
    best, best_key, cheapest = None, None, None
    for sw in candidates:
        c = cost(sw)
        if not isinstance(c, Cost):
            raise TypeError(f"cost({sw}) must return a Cost, got {type(c).__name__}")
        if len(c.branches) > 1 and not distributed:
            continue
        if cheapest is None or (c.macs, c.params) < (cheapest[1].macs, cheapest[1].params):
            cheapest = (sw, c)
        if not fits(c, budget):
            continue
        key = (c.macs, c.params, -len(c.branches))
        if best_key is None or key > best_key:
            best, best_key = sw, key
    if best is None:
        if cheapest is None:
            raise ValueError(f"no single-branch candidate among {[str(s) for s in candidates]}")
        sw, c = cheapest
        per_dev = max(m for m, _ in c.branches), max(p for _, p in c.branches)
        raise ValueError(
            f"no candidate switch fits {budget}: the cheapest, {sw}, needs {c.macs:.4g} MACs and "
            f"{c.params:.4g} params in total ({per_dev[0]:.4g} MACs / {per_dev[1]:.4g} params for its "
            f"largest branch)")
    return best
