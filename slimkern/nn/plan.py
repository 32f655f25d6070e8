"""The *plan* of a forward pass: which (switch, branch) blocks every slim layer computes.

A plan is set on each slim module of a net (a plain attribute ``_sk_plan``, never global
state) by ``set_switch`` / ``use_switch`` / ``forward_switches``. Its blocks are ordered
switch-major: ``[(0, 0), (0, 1), ..., (1, 0), ...]`` = (switch index, branch index). Every
layer turns the plan into its own block table once, when the plan is set.
"""
from __future__ import annotations

from typing import Iterable

from slimkern.switch import Switch


class Plan:
    """Switches of one (packed) forward pass; ``capture`` asks the fused layer to keep its
    packed input in ``features`` (for ``forward_switches(..., return_features=True)``)."""

    __slots__ = ("switches", "blocks", "segments", "capture", "features")

    def __init__(self, switches: Iterable[Switch], capture: bool = False):
        self.switches = tuple(switches)
        self.blocks = tuple((s, b) for s, sw in enumerate(self.switches) for b in range(sw.num_branches))
        segs, at = [], 0
        for sw in self.switches:
            segs.append((at, at + sw.num_branches))
            at += sw.num_branches
        self.segments = tuple(segs)  # block index range [g0, g1) of each switch
        self.capture = capture
        self.features: list = []

    def __repr__(self):
        return f"Plan([{', '.join(str(s) for s in self.switches)}])"


_DEFAULT = None


def default_plan() -> Plan:
    """The plan of a net no switch was set on: the base network ``[1.0]x``."""
    global _DEFAULT  # a cached constant, not state: the value never changes
    if _DEFAULT is None:
        _DEFAULT = Plan([Switch([1.0])])
    return _DEFAULT
