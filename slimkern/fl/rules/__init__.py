"""Federated rules, one class a file; the registry below names them.

Adding a rule: write ``slimkern/fl/rules/<name>.py`` holding one ``Rule`` subclass (its
``name``, its ``combine`` formula with the paper in the docstring, and whichever server-side
and client-side hooks of ``slimkern.fl.rules.base.Rule`` it changes), then add one line to
``REGISTRY``: ``"<name>": "<module>:<Class>"``. Rules are imported when first asked for,
so a rule with heavy dependencies costs nothing to the others.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from slimkern.fl.rules.base import Rule

__all__ = ["Rule", "REGISTRY", "RULES", "get_rule", "from_spec"]

REGISTRY: dict[str, str] = {
    "fedavg": "fedavg:FedAvg",
    "heterofl": "heterofl:HeteroFL",
    "fedrolex": "fedrolex:FedRolex",
    "fjord": "fjord:FjORD",
    "paradis": "paradis:ParaDiSFL",
    "clustered": "clustered:Clustered",
    "otfusion": "otfusion:OTFusion",
}


class _Rules(Mapping):
    """``name -> Rule class``, importing a rule's file on first use."""

    def __getitem__(self, name: str) -> type:
        if name not in REGISTRY:
            raise KeyError(name)
        module, cls = REGISTRY[name].split(":")
        return getattr(importlib.import_module(f"slimkern.fl.rules.{module}"), cls)

    def __iter__(self):
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


RULES = _Rules()


def get_rule(rule) -> Rule:
    """A ``Rule`` instance from an instance (returned as is) or a registered name
    (its default arguments)."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in REGISTRY:
        return RULES[rule]()
    if rule == "dwnp":  # per-device masks + a hypernetwork: not a rule of the round object
        raise ValueError("dwnp is not a rule of slimkern.fl.server: run it with slimkern.fl.dwnp.run_fl_dwnp or "
                         "slimkern.prune.dwnp_federated (slimkern fl --strategy dwnp does)")
    raise ValueError(f"unknown strategy {rule!r}; choose one of {sorted(REGISTRY)}")


def from_spec(spec: Mapping) -> Rule:
    """The rule ``Rule.spec()`` describes (a remote client rebuilds the server's rule)."""
    from slimkern.fl.rules.base import unplain
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ValueError(f"a rule spec is a mapping with a 'name', got {spec!r}")
    if spec["name"] not in REGISTRY:
        raise ValueError(f"unknown rule {spec['name']!r} in spec; choose one of {sorted(REGISTRY)}")
    args = {k: unplain(v) for k, v in dict(spec.get("args") or {}).items()}
    rule = RULES[spec["name"]](**args)
    rule.load_state(dict(spec.get("state") or {}))
    return rule
