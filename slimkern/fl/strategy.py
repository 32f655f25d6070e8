"""What each federated strategy asks of clients and server (used by ``simulate``).

A strategy maps a client's *tier switch* (what its hardware affords: ``[1.0]``, ``[0.5]``,
``[0.5, 0.5]`` for two small devices) to the switch it trains, may change that switch per
round (FedRolex) or per local step (FjORD), and aggregates with its rule from
``slimkern.fl.aggregate``. Server state is the flat vector of the full trainable
parameters (``Aggregator.flatten`` order); ``clustered`` keeps one per group.
"""
from __future__ import annotations

import random
from typing import Hashable, Sequence

from slimkern.fl import aggregate as rules
from slimkern.fl.heterofl_local import HeteroFLRecipe
from slimkern.fl.rolex import SubModel

__all__ = ["Strategy", "FedAvg", "HeteroFL", "FedRolex", "FjORD", "ParaDiSFL", "Clustered",
           "get_strategy", "STRATEGIES"]


def _switch_cls():
    from slimkern.switch import Switch
    return Switch


def _check_weighting(weighting) -> None:
    if weighting not in ("clients", "samples"):
        raise ValueError(f"weighting must be 'clients' or 'samples', got {weighting!r}")


def per_device_width(sw) -> float:
    """The widest branch: what one device of the client runs."""
    return max(b - a for a, b in sw.branches)


class Strategy:
    name = "base"
    rule = staticmethod(rules.paradis)
    grouped = False
    weighting: str | None = None  # "clients" | "samples"; None: the rule's reference default
    clip_norm: float | None = None  # gradient-norm clipping in local training (None: off)

    def client_switch(self, tier_switch, tier_switches: Sequence) -> Hashable:
        """The switch a client of ``tier_switch`` is assigned (fixed for the run)."""
        return _switch_cls().width(per_device_width(tier_switch))

    def round_switch(self, assigned, round_index: int):
        """The switch the client trains (and sends) in this round."""
        return assigned

    def task(self, cid: int, assigned: dict, round_index: int, seed: int, labels=None):
        """The key of what client ``cid`` trains and sends this round: a switch, or a
        ``slimkern.fl.rolex.SubModel`` (index sets, label split). ``assigned`` holds every
        client's assigned switch; ``labels`` the labels the client has data for (None when
        it holds all of them). Default: ``round_switch``."""
        return self.round_switch(assigned[cid], round_index)

    def train_logits(self, logits, key):
        """Logits entering the client's local loss (HeteroFL masks absent classes)."""
        return logits

    def local_context(self, net, switch):
        """A context manager open during a client's local training (HeteroFL's Scaler)."""
        import contextlib
        return contextlib.nullcontext()

    def step_switch(self, trained, rng: random.Random):
        """The switch of one local SGD step (default: the round's switch)."""
        return trained

    def step_switches(self, trained, rng: random.Random) -> list:
        """Switches trained together in one local step (one packed pass), the first one the
        client's own; the others are distilled from it (default: just ``step_switch``)."""
        return [self.step_switch(trained, rng)]

    def eval_switch(self, assigned):
        """The switch the tier is evaluated at."""
        return assigned

    def group(self, assigned):
        return None

    def aggregate(self, agg: rules.Aggregator, params: dict, updates, assigned, log):
        kw = {} if self.weighting is None else {"weighting": self.weighting}
        return self.rule(params, updates, agg, assigned=assigned, log=log, **kw)

    def __repr__(self):
        """The class and its arguments (every public attribute an instance sets), e.g.
        ``FedRolex(step=0.75, max_width=1.0, ...)``: a resumed run's strategy is compared by it."""
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class FedAvg(Strategy):
    """Everybody trains the same switch: ``switch`` or, by default, the widest one-branch
    switch that every tier can run on one device (the "small-model-only" baseline)."""
    name = "fedavg"
    rule = staticmethod(rules.fedavg)

    def __init__(self, switch=None):
        self.switch = switch

    def client_switch(self, tier_switch, tier_switches):
        if self.switch is not None:
            return self.switch
        return _switch_cls().width(min(per_device_width(s) for s in tier_switches))


class HeteroFL(HeteroFLRecipe, Strategy):
    """Prefix sub-networks ``[p]`` with ``p`` the client's per-device width (Diao et al. 2021),
    trained and averaged as the reference code does (``slimkern.fl.heterofl_local``): each element
    the plain mean over the clients holding it (``weighting="clients"``; ``"samples"``
    weights by sample counts), label split, the Scaler, gradient clipping at norm 1, and
    ``dynamic=True`` to re-draw every client's width each round."""
    name = "heterofl"
    rule = staticmethod(rules.heterofl)

    def __init__(self, *, weighting: str = "clients", label_split: bool = True, scaler: bool = True,
                 clip_norm: float | None = 1.0, dynamic: bool = False):
        _check_weighting(weighting)
        self.weighting = weighting
        self._init_recipe(label_split, scaler, clip_norm, dynamic)

    def task(self, cid, assigned, round_index, seed, labels=None):
        sw = self._round_width(cid, assigned, round_index, seed)
        labels = self._labels(labels)
        return sw if labels is None else SubModel(sw, labels=labels)


class FedRolex(HeteroFLRecipe, Strategy):
    """Rolling dense sub-models (Alam et al. 2022) as the reference code trains them
    (``slimkern.fl.rolex``): in round ``r`` a client of width ``p`` trains, per layer of
    ``C`` channels, the dense sub-matrix on ``idx = roll(arange(C), r mod C)[:round(p C)]``
    (``step=None``: one channel per round), gathered into the prefix of a re-indexed copy and
    scattered back; ``step`` (a fraction of each layer per round) rolls faster. Local
    training and options follow the reference's HeteroFL-based client (label split, Scaler,
    clipping at norm 1); tiers are evaluated at their prefix width."""
    name = "fedrolex"
    rule = staticmethod(rules.fedrolex)

    def __init__(self, step: float | None = None, max_width: float = 1.0, *, weighting: str = "clients",
                 label_split: bool = True, scaler: bool = True, clip_norm: float | None = 1.0,
                 dynamic: bool = False):
        if step is not None and not (isinstance(step, (int, float)) and step > 0):
            raise ValueError(f"step must be None (one channel per round) or a positive fraction, got {step!r}")
        _check_weighting(weighting)
        self.step, self.max_width, self.weighting = step, max_width, weighting
        self._init_recipe(label_split, scaler, clip_norm, dynamic)

    def round_switch(self, assigned, round_index):
        return SubModel(_switch_cls().width(per_device_width(assigned)), round_index, self.step, self.max_width)

    def task(self, cid, assigned, round_index, seed, labels=None):
        sw = self._round_width(cid, assigned, round_index, seed)
        return SubModel(_switch_cls().width(per_device_width(sw)), round_index, self.step, self.max_width,
                        self._labels(labels))


class FjORD(Strategy):
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
    rule = staticmethod(rules.fjord)

    def __init__(self, widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0), *, kd: bool = False,
                 weighting: str = "samples", bn: str = "server"):
        _check_weighting(weighting)
        if bn not in ("server", "travel"):
            raise ValueError(f"bn must be 'server' (recalibrated on server data) or 'travel', got {bn!r}")
        self.widths = tuple(sorted(widths))
        self.kd, self.weighting, self.bn = bool(kd), weighting, bn

    @property
    def bn_travel(self) -> bool:
        """Per-width BN statistics travel and are averaged as FjORD's do (``slimkern.fl.fjord_bn``)."""
        return self.bn == "travel"

    def bn_switches(self, trained) -> list:
        """The widths whose BN statistics a client of ``trained`` (its p_max) sends back."""
        pmax = per_device_width(trained)
        return [_switch_cls().width(w) for w in self.widths if w <= pmax + 1e-9] or [_switch_cls().width(pmax)]

    def step_switch(self, trained, rng):
        pmax = per_device_width(trained)
        choices = [w for w in self.widths if w <= pmax + 1e-9] or [pmax]
        return _switch_cls().width(rng.choice(choices))

    def step_switches(self, trained, rng):
        p = self.step_switch(trained, rng)
        top = _switch_cls().width(per_device_width(trained))
        return [top, p] if self.kd and p != top else [p]


def _inside(sub, sw) -> bool:
    """Every branch of ``sub`` lies inside one branch of ``sw`` (so ``sw``'s devices run it)."""
    return all(any(a <= lo + 1e-9 and hi <= b + 1e-9 for a, b in sw.branches) for lo, hi in sub.branches)


class ParaDiSFL(Strategy):
    """Clients train their tier switch, multi-branch ones over several devices.

    With ``nested=True`` (default) a client also trains, in the same packed pass, every
    other tier switch that its devices can run (those inside its own: a full device also
    trains ``[0.5, 0.5]`` and ``[0.5]``, a two-device client also ``[0.5]``), distilled
    in place from its own switch's logits -- ParaDiS Algorithm 1 run locally (Ozerov et
    al.; in-place distillation from Yu & Huang 2019). The trained elements stay within the
    client's own windows, so what travels and the aggregation are unchanged.
    """
    name = "paradis"
    rule = staticmethod(rules.paradis)

    def __init__(self, nested: bool = True):
        self.nested = nested
        self._tiers: tuple = ()

    def client_switch(self, tier_switch, tier_switches):
        self._tiers = tuple(tier_switches)
        return tier_switch

    def step_switches(self, trained, rng):
        if not self.nested:
            return [trained]
        return [trained] + [s for s in self._tiers if s != trained and _inside(s, trained)]

    def __repr__(self):
        return f"ParaDiSFL(nested={self.nested})"


class Clustered(Strategy):
    """One model per budget group, FedAvg inside each (the DAC paper's clustering baseline)."""
    name = "clustered"
    grouped = True

    def group(self, assigned):
        return assigned

    def aggregate(self, agg, params, updates, assigned, log):
        return rules.fedavg(params, updates, agg, assigned=assigned, log=log)


STRATEGIES = {c.name: c for c in (FedAvg, HeteroFL, FedRolex, FjORD, ParaDiSFL, Clustered)}


def get_strategy(strategy) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]()
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
