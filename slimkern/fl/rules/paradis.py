"""ParaDiS federated: clients train their tier switch, multi-branch ones over several devices."""
from __future__ import annotations

from slimkern.fl.aggregate import average
from slimkern.fl.rules.base import Rule, inside, switch_cls

__all__ = ["ParaDiSFL"]


class ParaDiSFL(Rule):
    """Clients train their tier switch, multi-branch ones over several devices.

    With ``nested=True`` (default) a client also trains, in the same packed pass, every
    other tier switch that its devices can run (those inside its own: a full device also
    trains ``[0.5, 0.5]`` and ``[0.5]``, a two-device client also ``[0.5]``), distilled
    in place from its own switch's logits -- ParaDiS Algorithm 1 run locally (Ozerov et
    al.; in-place distillation from Yu & Huang 2019). The trained elements stay within the
    client's own windows, so what travels and the aggregation are unchanged. The tier
    switches are learnt by the server (``client_switch``) and travel in ``state()``.
    """
    name = "paradis"

    def __init__(self, nested: bool = True):
        self.nested = nested
        self._tiers: tuple = ()

    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="samples"):
        """ParaDiS federated (after Ozerov et al., "ParaDiS: Parallelly distributable slimmable
        neural networks"): a client trains its switch -- one branch, or several disjoint
        channel ranges run on several devices and fused at the logits -- and the server
        aggregates by channel ranges: every window of every branch (for a conv, the diagonal
        block ``W[out_b, in_b]``; for the classifier, the column block ``W[:, in_b]`` and the
        bias once) is averaged element-wise over the clients that trained it."""
        return average(params, updates, windows, assigned, log, weighting=weighting)

    def client_switch(self, tier_switch, tier_switches):
        self._tiers = tuple(tier_switches)
        return tier_switch

    def step_switches(self, trained, rng):
        if not self.nested:
            return [trained]
        return [trained] + [s for s in self._tiers if s != trained and inside(s, trained)]

    def state(self) -> dict:
        return {"tiers": [str(s) for s in self._tiers]}

    def load_state(self, state: dict) -> None:
        self._tiers = tuple(switch_cls().parse(s) for s in state.get("tiers", ()))

    def __repr__(self):
        return f"ParaDiSFL(nested={self.nested})"
