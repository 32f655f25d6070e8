"""Federated training across devices of different capacity (see DESIGN.md, issue 7).

``partition`` splits data over clients, ``aggregate`` holds the sliced aggregation rules,
``budget`` assigns switches to clients, ``simulate`` runs rounds in process.
"""
from slimkern.fl.partition import partition, iid, dirichlet, shards, label_histogram  # noqa: F401
from slimkern.fl.aggregate import (  # noqa: F401
    Aggregator, AggregationReport, ClientUpdate, Layout, UpdateRejected,
    aggregate_loop, clustered, fedavg, fedrolex, fjord, heterofl, paradis, rolling_window,
)
from slimkern.fl.budget import Budget, Cost, assign_switch, fits, profile_cost  # noqa: F401
from slimkern.fl.strategy import STRATEGIES, Strategy, get_strategy  # noqa: F401
from slimkern.fl.simulate import (  # noqa: F401
    Client, History, RoundRecord, Tier, make_clients, parse_tiers, simulate,
)
