"""The federated rules under their first names (kept for users of ``slimkern.fl.strategy``).

Every rule is one class in one file under ``slimkern.fl.rules``; ``Strategy`` is their base
``slimkern.fl.rules.Rule`` and ``STRATEGIES`` the registry ``slimkern.fl.rules.RULES``.
"""
from __future__ import annotations

from slimkern.fl.rules import RULES as STRATEGIES
from slimkern.fl.rules import Rule as Strategy
from slimkern.fl.rules import get_rule as get_strategy
from slimkern.fl.rules.base import per_device_width
from slimkern.fl.rules.clustered import Clustered
from slimkern.fl.rules.fedavg import FedAvg
from slimkern.fl.rules.fedrolex import FedRolex
from slimkern.fl.rules.fjord import FjORD
from slimkern.fl.rules.heterofl import HeteroFL
from slimkern.fl.rules.paradis import ParaDiSFL

__all__ = ["Strategy", "FedAvg", "HeteroFL", "FedRolex", "FjORD", "ParaDiSFL", "Clustered",
           "get_strategy", "STRATEGIES", "per_device_width"]
