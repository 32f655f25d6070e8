"""FjORD: ordered dropout, a width sampled per local step, nested average."""
from __future__ import annotations

from typing import Sequence

from slimkern.fl.rules.base import Rule, check_weighting, per_device_width, switch_cls
from slimkern.fl.rules.heterofl import HeteroFL

__all__ = ["FjORD"]


class FjORD(Rule):
    """Ordered dropout (Horvath et al. 2021): per local step a width ``p ~ U{widths <= p_max}``.

    ``kd=True``: the self-distillation of Flower's ``baselines/fjord`` (``train_mode=fjord_kd``):
    every step also runs ``p_max``, whose loss is ``CE(y_pmax, y)`` and whose softmax is the
    sampled width's target, ``CE(y_p, softmax(y_pmax).detach())`` (one packed pass; when
    ``p = p_max`` only the first term). The reference's default is off.
    ``weighting="samples"`` (the reference's ``fjord_average`` weights by examples).
    ``bn="travel"``: the per-width BN statistics travel with the updates and are averaged per
    width over the clients with ``p_max >= p`` (``slimkern.fl.fjord_bn``), as Flower's
    baseline does with its ``ODBatchNorm2d``; the default ``"server"`` recalibrates them on
    server data before evaluation (HeteroFL's static BN).
    """
    name = "fjord"

    def __init__(self, widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), *, kd: bool = False,
                 weighting: str = "samples", bn: str = "server"):
        check_weighting(weighting)
        if bn not in ("server", "travel"):
            raise ValueError(f"bn must be 'server' (recalibrated on server data) or 'travel', got {bn!r}")
        self.widths = tuple(sorted(widths))
        self.kd, self.weighting, self.bn = bool(kd), weighting, bn

    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="samples"):
        """FjORD (Horvath et al., NeurIPS 2021, "FjORD: Fair and accurate federated learning
        under heterogeneous targets with ordered dropout"): a client of maximum width p_max
        samples a width ``p ~ U{widths <= p_max}`` per local step (ordered dropout keeps the
        first ``p`` fraction of channels) and returns its p_max prefix; the server averages
        nested: each element over the clients whose p_max prefix holds it, weighted by samples.
        The sampling happens in local training (``step_switch``); here the update's switch is
        the client's p_max prefix. Flower's ``baselines/fjord`` (``fjord_average``) weights by
        examples, so ``weighting="samples"`` is the default here."""
        return HeteroFL.combine(params, updates, windows, assigned, log, weighting=weighting)

    @property
    def bn_travel(self) -> bool:
        """Per-width BN statistics travel and are averaged as FjORD's do (``slimkern.fl.fjord_bn``)."""
        return self.bn == "travel"

    def bn_switches(self, trained) -> list:
        """The widths whose BN statistics a client of ``trained`` (its p_max) sends back."""
        pmax = per_device_width(trained)
        return [switch_cls().width(w) for w in self.widths if w <= pmax + 1e-9] or [switch_cls().width(pmax)]

    def step_switch(self, trained, rng):
        pmax = per_device_width(trained)
        choices = [w for w in self.widths if w <= pmax + 1e-9] or [pmax]
        return switch_cls().width(rng.choice(choices))

    def step_switches(self, trained, rng):
        p = self.step_switch(trained, rng)
        top = switch_cls().width(per_device_width(trained))
        return [top, p] if self.kd and p != top else [p]
