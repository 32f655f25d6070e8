"""Federated training across devices of different capacity (see DESIGN.md, issues 7, 14).

``partition`` splits data over clients, ``rules`` holds the rules (one class a file),
``aggregate`` the sliced average they share, ``budget`` assigns switches to clients,
``server`` is the transport-free server round object, ``client`` the client function,
``simulate`` runs rounds in process and ``flower`` behind Flower apps; ``run_fl_dwnp`` runs
DWNP's device-wise pruning (``slimkern.prune.dwnp_federated``) on the same clients.
"""
from slimkern.fl.partition import partition, iid, dirichlet, shards, label_histogram  # noqa: F401
from slimkern.fl.aggregate import (  # noqa: F401
    Aggregator, AggregationReport, ClientUpdate, Layout, UpdateRejected,
    aggregate_loop, clustered, fedavg, fedrolex, fjord, heterofl, paradis, rolling_window,
)
from slimkern.fl.budget import Budget, Cost, assign_switch, fits, profile_cost  # noqa: F401
from slimkern.fl.strategy import STRATEGIES, Strategy, get_strategy  # noqa: F401
from slimkern.fl.rules import REGISTRY, RULES, Rule, get_rule  # noqa: F401
from slimkern.fl.client import Task, train_task  # noqa: F401
from slimkern.fl.server import RoundPlan, Server, reply_model  # noqa: F401
from slimkern.fl.simulate import (  # noqa: F401
    Client, History, RoundRecord, Tier, make_clients, parse_tiers, simulate,
)
from slimkern.fl.dwnp import run_fl_dwnp  # noqa: F401
