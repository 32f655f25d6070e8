"""Client budgets and the switch each client can afford.

A ``Budget`` is what one device of a client can run: at most ``macs`` multiply-adds per
sample, ``params`` parameters and ``memory`` bytes of peak memory (any may be None =
unlimited), on each of ``devices`` identical devices. A branch's memory is its parameter
bytes plus its peak activation bytes for one input of ``input_size``
(``slimkern.profile``'s closed forms; training needs more -- gradients, optimizer state,
a batch -- so give the budget that headroom). A one-branch switch runs on one device, so it fits when its total cost
fits one device. A ParaDiS switch (several branches fused only at the logits, Ozerov et
al.) can be spread over the devices: it fits when its branches can be packed onto
``devices`` devices with every device's summed cost within the budget (first-fit
decreasing, exact for the usual "one branch per device" case). A household with two phones
of the 0.5x size thus trains ``[0.5, 0.5]`` while one phone trains ``[0.5]``.

``assign_switch`` returns the best fitting candidate: the largest total MACs (then params,
then fewer branches: less fusion traffic), raising a ValueError that states the cheapest
candidate's cost and the budget when none fits.

Tiers as budgets: ``slimkern.fl.parse_tiers("phone={macs=2M,devices=2}:0.3,...")`` gives a
tier with a ``Budget`` and no switch; ``simulate`` (or ``assign_tiers``) chooses its switch
with ``assign_switch`` among ``default_candidates`` (one-branch widths in steps of 1/8 and
equal ParaDiS splits over up to ``devices`` devices) on the net's own profile.
``choose_switch(net, budget, input_size, candidates)`` (also ``slimkern.choose_switch``)
does the same for one model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

__all__ = ["Budget", "Cost", "assign_switch", "fits", "profile_cost", "parse_budget", "default_candidates",
           "choose_switch", "assign_tiers", "resolve_clients", "net_max_width"]


@dataclass(frozen=True)
class Budget:
    """Per device: ``macs`` multiply-adds per sample, ``params`` parameters, ``memory``
    bytes of peak memory (parameters + peak activations); ``devices`` identical devices."""
    macs: float | None = None
    params: float | None = None
    devices: int = 1
    memory: float | None = None

    def __post_init__(self):
        for name in ("macs", "params", "memory"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise ValueError(f"Budget.{name} must be a positive number or None, got {v!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"Budget.devices must be an int >= 1, got {self.devices!r}")


@dataclass(frozen=True)
class Cost:
    """Per-branch cost of a switch: ``branches[i] = (macs, params)`` or
    ``(macs, params, memory_bytes)`` of branch i (memory is needed for memory budgets)."""
    branches: tuple[tuple[float, ...], ...]

    @property
    def macs(self) -> float:
        return sum(b[0] for b in self.branches)

    @property
    def params(self) -> float:
        return sum(b[1] for b in self.branches)

    @property
    def memory(self) -> float | None:
        """Summed memory of the branches (None when a branch does not give it)."""
        if any(len(b) < 3 for b in self.branches):
            return None
        return sum(b[2] for b in self.branches)


def profile_cost(net, input_size) -> Callable[[Hashable], Cost]:
    """A cost function ``switch -> Cost`` backed by ``slimkern.profile(net, sw, input_size)``."""
    import torch

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
        itemsize = torch.empty((), dtype=getattr(prof, "dtype", torch.float32)).element_size()
        out = []
        for b in per:
            get = b.get if isinstance(b, dict) else (lambda k, _b=b: getattr(_b, k))
            params = float(get("params"))
            try:
                memory = params * itemsize + float(get("peak_activation_bytes"))
            except (KeyError, AttributeError):
                out.append((float(get("macs")), params))
                continue
            out.append((float(get("macs")), params, memory))
        return Cost(tuple(out))

    return cost


def _within(macs: float, params: float, budget: Budget, memory: float | None = None) -> bool:
    if budget.memory is not None and memory is None:
        raise ValueError("a memory budget needs costs with memory (macs, params, memory_bytes) per branch; "
                         "profile_cost(net, input_size) gives them")
    return ((budget.macs is None or macs <= budget.macs * (1 + 1e-9))
            and (budget.params is None or params <= budget.params * (1 + 1e-9))
            and (budget.memory is None or memory <= budget.memory * (1 + 1e-9)))


def fits(cost: Cost, budget: Budget) -> bool:
    """Whether the switch of ``cost`` runs within ``budget`` (module docstring): on one
    device, or with its branches packed first-fit decreasing onto ``budget.devices``."""
    if _within(cost.macs, cost.params, budget, cost.memory):
        return True
    if len(cost.branches) == 1 or budget.devices == 1:
        return False
    has_mem = cost.memory is not None
    bins: list[list[float]] = []
    for br in sorted(cost.branches, key=lambda b: tuple(b), reverse=True):
        m, p, mem = br[0], br[1], (br[2] if has_mem else 0.0)
        for b in bins:
            if _within(b[0] + m, b[1] + p, budget, b[2] + mem if has_mem else None):
                b[0] += m
                b[1] += p
                b[2] += mem
                break
        else:
            if len(bins) == budget.devices or not _within(m, p, budget, mem if has_mem else None):
                return False
            bins.append([m, p, mem])
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
    unusable = []
    for sw in candidates:
        try:
            c = cost(sw)
        except ValueError as exc:  # a candidate this net cannot run (e.g. a branch with no channels)
            unusable.append(f"{sw}: {exc}")
            continue
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
            what = "usable" if distributed else "usable single-branch"
            raise ValueError(f"no {what} candidate among {[str(s) for s in candidates]}"
                             + (f" ({'; '.join(unusable[:3])})" if unusable else ""))
        sw, c = cheapest
        per_dev = max(b[0] for b in c.branches), max(b[1] for b in c.branches)
        mem = "" if c.memory is None else f", {c.memory:.4g} bytes of memory"
        raise ValueError(
            f"no candidate switch fits {budget}: the cheapest, {sw}, needs {c.macs:.4g} MACs and "
            f"{c.params:.4g} params{mem} in total ({per_dev[0]:.4g} MACs / {per_dev[1]:.4g} params for its "
            f"largest branch)")
    return best


# -- budgets as text, candidates, and the one-model / per-tier helpers -----------------------

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTES = {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2.0 ** 10, "mib": 2.0 ** 20,
          "gib": 2.0 ** 30, "tib": 2.0 ** 40}
_KEYS = {"macs": "macs", "flops": "macs", "params": "params", "parameters": "params", "memory": "memory",
         "mem": "memory", "devices": "devices"}


def _amount(key: str, text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise ValueError(f"budget {key}={text!r}: not a number (e.g. 2.5M, 3e6, 64KiB)")
    value, unit = float(m.group(1)), m.group(2)
    if key == "memory" and unit.lower() in _BYTES:
        return value * _BYTES[unit.lower()]
    if unit in _SI:
        return value * _SI[unit]
    raise ValueError(f"budget {key}={text!r}: unknown unit {unit!r} (k, M, G"
                     + (", B, KB, MB, GB, KiB, MiB, GiB" if key == "memory" else "") + ")")


def parse_budget(text: str) -> Budget:
    """``"macs=2.5M,params=20k,memory=1MiB,devices=2"`` -> ``Budget`` (keys in any order,
    each at most once; numbers take k/M/G suffixes, memory also B/KB/MB/GB/KiB/MiB/GiB)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a budget needs at least one of macs=, params=, memory= (and optionally devices=)")
    got: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"budget entry {part.strip()!r}: expected key=value with key macs, params, "
                             "memory or devices")
        k, v = (x.strip() for x in part.split("=", 1))
        key = _KEYS.get(k.lower())
        if key is None:
            raise ValueError(f"budget entry {part.strip()!r}: unknown key {k!r}; use macs, params, memory, devices")
        if key in got:
            raise ValueError(f"budget {text!r}: {key} given twice")
        if key == "devices":
            if not re.fullmatch(r"\d+", v):
                raise ValueError(f"budget devices={v!r}: must be a whole number >= 1")
            got[key] = int(v)
        else:
            got[key] = _amount(key, v)
    if not any(k in got for k in ("macs", "params", "memory")):
        raise ValueError(f"budget {text!r} limits nothing: give macs=, params= or memory=")
    return Budget(**got)


def default_candidates(max_width: float = 1.0, devices: int = 1, step: float = 0.125) -> list:
    """Switches to choose from: ``[w]`` for ``w = step, 2 step, ..., max_width`` and, for
    ``k = 2 .. devices``, the equal ParaDiS splits ``[w, ..., w]`` (k branches, ``k w <= max_width``)."""
    from slimkern.switch import Switch

    n = int(round(max_width / step + 1e-9))
    widths = [round(i * step, 9) for i in range(1, n + 1)]
    out = [Switch([w]) for w in widths]
    for k in range(2, max(1, int(devices)) + 1):
        out += [Switch([w] * k) for w in widths if k * w <= max_width + 1e-9]
    return out


def net_max_width(net) -> float:
    """The widest fraction every slim layer of ``net`` is built for (1.0 when none says)."""
    ws = [float(m.max_width) for m in net.modules()
          if isinstance(getattr(m, "max_width", None), (int, float)) and not isinstance(m.max_width, bool)]
    return min(ws) if ws else 1.0


def _as_budget(budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return parse_budget(budget)
    if isinstance(budget, dict):
        return Budget(**budget)
    raise TypeError(f"budget must be a Budget, a dict of its fields or a string like 'macs=2M,devices=2', "
                    f"got {type(budget).__name__}")


def choose_switch(net, budget, input_size, candidates: Sequence[Hashable] | None = None,
                  distributed: bool = True):
    """The best switch of ``net`` within ``budget`` (module docstring).

    Args:
        net: a slimmable / ParaDiS net (``slimkern.profile`` must run it).
        budget: a ``Budget``, a dict of its fields, or text ``"macs=2M,memory=4MiB,devices=2"``.
        input_size: one input's size with batch 1, e.g. ``(1, 3, 32, 32)``; MACs and
            activation memory are per sample at this size.
        candidates: switches to choose from (default: ``default_candidates`` for the net's
            max width and the budget's devices); ones the net cannot run are skipped.
        distributed: whether multi-branch switches may be chosen.

    Returns the switch with the most MACs that fits (then params, then fewer branches);
    raises ValueError naming the cheapest candidate's cost when none fits.
    """
    b = _as_budget(budget)
    cands = list(candidates) if candidates is not None else default_candidates(net_max_width(net), b.devices)
    return assign_switch(b, cands, profile_cost(net, input_size), distributed=distributed)


def assign_tiers(tiers, net, input_size, candidates: Sequence[Hashable] | None = None) -> list:
    """``tiers`` with the switch of every budget-only tier chosen by ``choose_switch``
    (tiers that give a switch are kept as they are)."""
    import dataclasses

    out = []
    cache: dict = {}
    for t in tiers:
        if getattr(t, "switch", None) is None:
            b = getattr(t, "budget", None)
            if b is None:
                raise ValueError(f"tier {t.name!r} gives neither a switch nor a budget")
            t = dataclasses.replace(t, switch=_chosen(cache, b, t.name, net, input_size, candidates))
        out.append(t)
    return out


def _chosen(cache: dict, budget, tier, net, input_size, candidates):
    """choose_switch once per distinct budget; its error names the tier."""
    if budget not in cache:
        try:
            cache[budget] = choose_switch(net, budget, input_size, candidates)
        except ValueError as exc:
            raise ValueError(f"tier {tier!r}: {exc}") from None
    return cache[budget]


def resolve_clients(clients, net, input_size, candidates: Sequence[Hashable] | None = None, log=None) -> list:
    """``clients`` with the switch of every client that has a ``budget`` and no
    ``tier_switch`` chosen by ``choose_switch`` (one choice per distinct budget); used by
    ``slimkern.fl.simulate``. A client with neither is a ValueError naming it."""
    import dataclasses

    chosen: dict = {}
    out = []
    for c in clients:
        if getattr(c, "tier_switch", None) is None:
            b = getattr(c, "budget", None)
            if b is None:
                raise ValueError(f"client {c.id} (tier {c.tier!r}) has neither a switch nor a budget")
            if b not in chosen and log is not None:
                log(f"tier {c.tier}: {b} -> switch {_chosen(chosen, b, c.tier, net, input_size, candidates)}")
            c = dataclasses.replace(c, tier_switch=_chosen(chosen, b, c.tier, net, input_size, candidates))
        out.append(c)
    return out
