"""The base of every federated rule: what it asks of clients and of the server.

A rule maps a client's *tier switch* (what its hardware affords: ``[1.0]``, ``[0.5]``,
``[0.5, 0.5]`` for two small devices) to the switch it trains, may change that switch per
round (FedRolex) or per local step (FjORD), shapes the client's local loss (HeteroFL's
label mask, Scaler, clipping) and averages the replies with its formula (``combine``, one
element-wise weighted mean over index windows, ``slimkern.fl.aggregate``). Server state is
the flat vector of the full trainable parameters (``Aggregator.flatten`` order); a
``grouped`` rule (``clustered``) keeps one per group.

The server round object (``slimkern.fl.server``) calls ``client_switch``, ``task``,
``eval_switch``, ``group`` and ``aggregate``; the client function (``slimkern.fl.client``)
calls ``step_switches``, ``train_logits``, ``local_context`` and reads ``clip_norm``. A
rule travels to a remote client as ``spec()`` (plain JSON) and comes back with
``slimkern.fl.rules.from_spec``.
"""
from __future__ import annotations

import contextlib
import random
from typing import Hashable, Sequence

from slimkern.fl.aggregate import average

__all__ = ["Rule", "per_device_width", "check_weighting", "inside", "switch_cls"]


def switch_cls():
    from slimkern.switch import Switch
    return Switch


def check_weighting(weighting) -> None:
    if weighting not in ("clients", "samples"):
        raise ValueError(f"weighting must be 'clients' or 'samples', got {weighting!r}")


def per_device_width(sw) -> float:
    """The widest branch: what one device of the client runs."""
    return max(b - a for a, b in sw.branches)


def inside(sub, sw) -> bool:
    """Every branch of ``sub`` lies inside one branch of ``sw`` (so ``sw``'s devices run it)."""
    return all(any(a <= lo + 1e-9 and hi <= b + 1e-9 for a, b in sw.branches) for lo, hi in sub.branches)


def _plain(v):
    """A JSON value of a rule argument (switches as ``{"switch": notation}``)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "branches"):
        return {"switch": str(v)}
    raise TypeError(f"a rule argument must be plain data or a Switch to travel, got {type(v).__name__}")


def unplain(v):
    if isinstance(v, dict) and set(v) == {"switch"}:
        return switch_cls().parse(v["switch"])
    if isinstance(v, list):
        return tuple(unplain(x) for x in v)
    return v


class Rule:
    """The default rule: every client trains its assigned switch (the per-device width of
    its tier) and the replies are averaged element-wise over the windows they trained."""
    name = "base"
    grouped = False
    weighting: str | None = None  # "clients" | "samples"; None: the rule's reference default
    clip_norm: float | None = None  # gradient-norm clipping in local training (None: off)

    # -- the formula ----------------------------------------------------------------------
    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="samples"):
        """The element-wise weighted mean over the windows each update trained
        (``slimkern.fl.aggregate.average``); returns ``(params, report)``."""
        return average(params, updates, windows, assigned, log, weighting=weighting)

    def aggregate(self, agg, params: dict, updates, assigned, log):
        """``combine`` with this rule's weighting (server side)."""
        kw = {} if self.weighting is None else {"weighting": self.weighting}
        return self.combine(params, updates, agg, assigned=assigned, log=log, **kw)

    # -- server side: who trains what ----------------------------------------------------
    def client_switch(self, tier_switch, tier_switches: Sequence) -> Hashable:
        """The switch a client of ``tier_switch`` is assigned (fixed for the run)."""
        return switch_cls().width(per_device_width(tier_switch))

    def round_switch(self, assigned, round_index: int):
        """The switch the client trains (and sends) in this round."""
        return assigned

    def task(self, cid: int, assigned: dict, round_index: int, seed: int, labels=None):
        """The key of what client ``cid`` trains and sends this round: a switch, or a
        ``slimkern.fl.rolex.SubModel`` (index sets, label split). ``assigned`` holds every
        client's assigned switch; ``labels`` the labels the client has data for (None when
        it holds all of them). Default: ``round_switch``."""
        return self.round_switch(assigned[cid], round_index)

    def eval_switch(self, assigned):
        """The switch the tier is evaluated at."""
        return assigned

    def group(self, assigned):
        return None

    # -- client side: local training -----------------------------------------------------
    def train_logits(self, logits, key):
        """Logits entering the client's local loss (HeteroFL masks absent classes)."""
        return logits

    def local_context(self, net, switch):
        """A context manager open during a client's local training (HeteroFL's Scaler)."""
        return contextlib.nullcontext()

    def step_switch(self, trained, rng: random.Random):
        """The switch of one local SGD step (default: the round's switch)."""
        return trained

    def step_switches(self, trained, rng: random.Random) -> list:
        """Switches trained together in one local step (one packed pass), the first one the
        client's own; the others are distilled from it (default: just ``step_switch``)."""
        return [self.step_switch(trained, rng)]

    # -- travel ---------------------------------------------------------------------------
    def state(self) -> dict:
        """What the server learnt at run time that the clients need (plain JSON)."""
        return {}

    def load_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"rule {self.name!r} carries no state, got {sorted(state)}")

    def spec(self) -> dict:
        """``{"name", "args", "state"}``: the rule as plain JSON (``rules.from_spec`` inverts it)."""
        return {"name": self.name,
                "args": {k: _plain(v) for k, v in vars(self).items() if not k.startswith("_")},
                "state": self.state()}

    def __repr__(self):
        """The class and its arguments (every public attribute an instance sets), e.g.
        ``FedRolex(step=0.75, max_width=1.0, ...)``: a resumed run's rule is compared by it."""
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
