"""Resource budgets of compressed models: validation, units, reachability.

A budget bounds a model's cost as ``slimkern.profile`` measures it at a given input size:
``macs`` (multiply-accumulates) and/or ``params``, given either as absolute counts
(``{"macs": 2e6, "params": 50_000}``) or as fractions of the unpruned model
(``{"macs_ratio": 0.5, "params_ratio": 0.6}``). One budget, and one list of budgets, uses
one kind of unit: mixing counts and ratios is refused, since "0.5" could mean either.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Budget", "parse_budgets"]

_ABS = ("macs", "params")
_REL = ("macs_ratio", "params_ratio")


@dataclass(frozen=True)
class Budget:
    """Absolute bounds (None = unbounded). ``met(macs, params)`` is DAC's stopping rule
    negated: Algorithm 1 runs *while* ``MACs >= M or params >= P``."""

    macs: float | None = None
    params: float | None = None

    def met(self, macs: int, params: int) -> bool:
        return (self.macs is None or macs < self.macs) and (self.params is None or params < self.params)

    def as_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params}

    def __str__(self) -> str:
        parts = [f"MACs < {self.macs:,.0f}" if self.macs is not None else None,
                 f"params < {self.params:,.0f}" if self.params is not None else None]
        return " and ".join(p for p in parts if p)


def _number(v, key: str, i: int) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"budget {i}: {key} must be a finite number, got {v!r}")
    if v <= 0:
        raise ValueError(f"budget {i}: {key} must be > 0, got {v!r}")
    return float(v)


def parse_budgets(budgets, full_macs: int, full_params: int) -> list[Budget]:
    """Absolute ``Budget``s from a list of mappings (see the module docstring).

    Raises TypeError/ValueError for a non-list, an empty budget, an unknown key, a
    non-positive value, a ratio above 1 or mixed units (counts and ratios)."""
    if isinstance(budgets, Mapping) or not isinstance(budgets, (list, tuple)) or not budgets:
        raise TypeError("budgets must be a non-empty list of mappings like {'macs': 2e6} or {'macs_ratio': 0.5}, "
                        f"got {budgets!r}")
    kinds = set()
    out = []
    for i, b in enumerate(budgets):
        if not isinstance(b, Mapping) or not b:
            raise TypeError(f"budget {i} must be a non-empty mapping, got {b!r}")
        unknown = sorted(set(b) - set(_ABS) - set(_REL))
        if unknown:
            raise ValueError(f"budget {i}: unknown key(s) {unknown}; use {list(_ABS)} (counts) or {list(_REL)} "
                             "(fractions of the unpruned model)")
        kind = {"abs" if k in _ABS else "rel" for k in b}
        if len(kind) > 1:
            raise ValueError(f"budget {i} mixes units ({sorted(b)}): give counts ({list(_ABS)}) or ratios "
                             f"({list(_REL)}), not both")
        kinds |= kind
        vals = {k: _number(v, k, i) for k, v in b.items()}
        if "rel" in kind:
            for k, v in vals.items():
                if v > 1:
                    raise ValueError(f"budget {i}: {k} is a fraction of the unpruned model and must be in (0, 1], "
                                     f"got {v}")
            out.append(Budget(vals["macs_ratio"] * full_macs if "macs_ratio" in vals else None,
                              vals["params_ratio"] * full_params if "params_ratio" in vals else None))
        else:
            out.append(Budget(vals.get("macs"), vals.get("params")))
    if len(kinds) > 1:
        raise ValueError("budgets mix units: some give counts (macs/params), others ratios (macs_ratio/"
                         "params_ratio); use one kind for all")
    return out
