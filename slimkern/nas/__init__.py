"""``slimkern.nas``: multi-platform optimal width search (OWS / AOWS on a chain MRF).

Wang & Blaschko, "Optimizing Slimmable Networks for Multiple Target Platforms", built on
AOWS (Berman et al., "AOWS: Adaptive and optimal network width search with latency
constraints", CVPR 2020). A net is a chain of width groups; a configuration is one channel
count per group (a per-layer ``Switch.from_channels``); per-platform searches are
``slimkern.solvers.viterbi_budget`` on unary statistics and pairwise resource costs.

* ``platforms``: ``Platform``, ``WEIGHT_SETTINGS``, CRP market weights.
* ``space``: the chain of width groups and per-group channel choices (``search_space``).
* ``costs``: pairwise MACs / params / peak-activation tables (``cost_model``).
* ``latency``: timings of random configurations fitted as per-pair terms (``fit_latency``: bilinear;
  ``fit_latency_table``: AOWS's full tables with a monotonicity penalty, ``biased_paths`` to time).
* ``graph_search``: residual nets (tied widths): exact search by min-sum elimination (``graph_search``).
* ``unary``: windowed moving averages of attributed losses (``UnaryStats``).
* ``search``: per-platform Viterbi under budgets (``search``), the AOWS sampler and schedule.
* ``train``: the search phase (``WidthSearchTrainer``: OWS / AOWS) and retraining (``ConfigTrainer``).
"""
from slimkern.nas.platforms import (COSTS, WEIGHT_SETTINGS, Platform, check_platforms, crp_partition,
                                    crp_weights, setting_weights)
from slimkern.nas.space import AOWS_FRACTIONS, SearchSpace, search_space
from slimkern.nas.costs import CostModel, cost_model
from slimkern.nas.latency import BilinearLatency, LatencyModel, fit_latency, measure_latency
from slimkern.nas.latency_table import LatencyTable, biased_paths, fit_latency_table, pair_counts
from slimkern.nas.unary import ATTRIBUTIONS, UnaryStats
from slimkern.nas.graph_search import GraphCostModel, graph_cost_model, graph_search
from slimkern.nas.search import (AOWSSampler, PlatformResult, SearchResult, aows_schedule, schedule_temperature,
                                 search)
from slimkern.nas.train import ConfigTrainer, WidthSearchTrainer, drop_bn_rows

__all__ = ["GraphCostModel", "graph_cost_model", "graph_search", "BilinearLatency", "LatencyModel", "LatencyTable", "biased_paths", "fit_latency", "fit_latency_table", "pair_counts", "measure_latency", "ConfigTrainer", "WidthSearchTrainer", "drop_bn_rows", "AOWSSampler", "PlatformResult", "SearchResult", "aows_schedule", "schedule_temperature", "search",
           "ATTRIBUTIONS", "UnaryStats", "AOWS_FRACTIONS", "CostModel", "SearchSpace", "cost_model", "search_space", "COSTS", "Platform", "WEIGHT_SETTINGS", "check_platforms", "crp_partition", "crp_weights",
           "setting_weights"]
