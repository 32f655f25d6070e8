"""FedAvg: every client trains the same switch (the small-model-only baseline)."""
from __future__ import annotations

from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import average
from slimkern.fl.rules.base import Rule, per_device_width, switch_cls

__all__ = ["FedAvg"]


class FedAvg(Rule):
    """Everybody trains the same switch: ``switch`` or, by default, the widest one-branch
    switch that every tier can run on one device (the "small-model-only" baseline)."""
    name = "fedavg"

    def __init__(self, switch=None):
        self.switch = switch

    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="samples"):
        """FedAvg (McMahan et al. 2017, "Communication-efficient learning of deep networks from
        decentralized data"): every client trains the same switch; the new weights are the
        sample-weighted mean ``sum_k n_k W_k / sum_k n_k`` over that switch's windows (elements
        outside the switch keep their value). An update of another switch than the round's (the
        assigned one, else the most common) is rejected with the reason (``validate.one_switch``)."""
        updates, pre = _validate.one_switch(updates, assigned, "fedavg", log)
        return average(params, updates, windows, assigned, log, pre, weighting)

    def client_switch(self, tier_switch, tier_switches):
        if self.switch is not None:
            return self.switch
        return switch_cls().width(min(per_device_width(s) for s in tier_switches))
