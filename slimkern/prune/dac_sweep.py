"""DAC's client sweeps (Li & Sanyal, Figures 4-5, scaled to digits): accuracy of the clustered
FedAvg models against the number of clients, under several data / local-training scenarios.

The server's work (pre-training on the reference data, Algorithm 1 per budget, optional
width-multiplier baselines: ``dac_server``) does not depend on the clients, so it runs once per
seed; every (scenario, number of clients) pair then re-partitions the same client data and
runs the clusters' FedAvg from copies of the same server models. Clients get budgets
round-robin (client ``i`` budget ``i mod len(budgets)``), so every budget's cluster has
``N / len(budgets)`` clients.

A scenario is ``(partition, local_epochs)``: ``partition`` in {"iid", "dirichlet", "shards"}
(``slimkern.fl.partition``), ``local_epochs`` an int (identical for every client) or
``"random"`` (drawn per client and round from {3, 4, 5}, the paper's heterogeneous setting).
``"shards"`` gives every client ``max(classes_per_client, ceil(num_classes / N))`` classes:
exactly 2 (the paper's non-IID split) once ``N >= 5`` on 10 classes; with fewer clients two
classes each cannot cover the data, so each client gets the fewest classes that do (5 for
N = 2, 3 for N = 4), and the report records the number used.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from slimkern.prune.dac_federated import _budget_keys, _fedavg, _loader, dac_server

__all__ = ["DEFAULT_SCENARIOS", "dac_client_sweep", "shard_classes"]

DEFAULT_SCENARIOS = {"iid": ("iid", 1), "iid-random-epochs": ("iid", "random"), "2-class": ("shards", 1)}


def shard_classes(num_clients: int, num_classes: int, classes_per_client: int = 2) -> int:
    """Classes per client of the ``"shards"`` split: ``max(k, ceil(num_classes / N))`` (module docstring)."""
    return max(int(classes_per_client), math.ceil(num_classes / num_clients))


def _check(clients, scenarios, budgets):
    if not clients or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in clients):
        raise ValueError(f"dac_client_sweep: clients must be a non-empty list of ints >= 1, got {clients!r}")
    if not budgets:
        raise ValueError("dac_client_sweep: need at least one budget")
    if min(clients) < len(budgets):
        raise ValueError(f"dac_client_sweep: {min(clients)} clients cannot cover {len(budgets)} budgets "
                         "(every budget needs a cluster)")
    if not scenarios:
        raise ValueError("dac_client_sweep: need at least one scenario")
    for name, sc in scenarios.items():
        if not (isinstance(sc, (tuple, list)) and len(sc) == 2):
            raise ValueError(f"dac_client_sweep: scenario {name!r} must be (partition, local_epochs), got {sc!r}")
        part, ep = sc
        if part not in ("iid", "dirichlet", "shards"):
            raise ValueError(f"dac_client_sweep: scenario {name!r}: partition must be iid, dirichlet or shards, "
                             f"got {part!r}")
        if ep != "random" and (isinstance(ep, bool) or not isinstance(ep, int) or ep < 1):
            raise ValueError(f"dac_client_sweep: scenario {name!r}: local_epochs must be an int >= 1 or 'random', "
                             f"got {ep!r}")


def dac_client_sweep(model: nn.Module, budgets: Sequence[dict], train: Dataset, labels, test: Dataset, *,
                     input_size, clients: Sequence[int] = (2, 4, 8, 16), scenarios: dict | None = None,
                     reference_fraction: float = 0.2, rounds: int = 4, lr: float = 0.01, momentum: float = 0.5,
                     batch_size: int = 32, pretrain_epochs: int = 5, pretrain_lr: float = 0.05,
                     width_baselines: bool = False, full_baseline: bool = True, alpha: float = 0.5,
                     classes_per_client: int = 2, dac_options: dict | None = None, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict:
    """One seed of the sweep (module docstring). ``train`` holds the reference and the client data
    (``reference_fraction`` of it, drawn with ``seed``, is the server's); ``labels`` its labels.

    Returns ``{"seed", "full", "server_models": [...], "dac_history", "rows": [...], "seconds"}``,
    one row per (scenario, N, model) with the final test accuracy and the per-round curve;
    model ``"full"`` is the 1.0x model trained by FedAvg over all N clients.
    """
    from slimkern.fl import partition

    t0 = time.perf_counter()
    say = log or (lambda s: None)
    scenarios = dict(DEFAULT_SCENARIOS if scenarios is None else scenarios)
    budgets = [dict(k) for k in dict.fromkeys(_budget_keys(budgets))]
    _check(list(clients), scenarios, budgets)
    if not 0 < reference_fraction < 1:
        raise ValueError(f"dac_client_sweep: reference_fraction must be in (0, 1), got {reference_fraction}")
    labels = np.asarray(labels)
    if len(labels) != len(train):
        raise ValueError(f"dac_client_sweep: {len(labels)} labels for {len(train)} training samples")
    perm = np.random.default_rng(seed).permutation(len(labels))
    k = int(round(reference_fraction * len(perm)))
    ref, rest = perm[:k].tolist(), perm[k:]
    num_classes = int(labels.max()) + 1
    server = dac_server(model, budgets, Subset(train, ref), test, input_size=input_size, batch_size=batch_size,
                        pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr, width_baselines=width_baselines,
                        dac_options=dac_options, seed=seed, log=log)
    test_loader = _loader(test, 256, 0, shuffle=False)
    keys = _budget_keys(budgets)
    rows = []
    for name, (part, epochs) in scenarios.items():
        for n in clients:
            cpc = shard_classes(n, num_classes, classes_per_client)
            parts = partition(labels[rest], n, part, alpha=alpha, classes_per_client=cpc, seed=seed)
            sets = [Subset(train, rest[p].tolist()) for p in parts]
            member = [keys[i % len(keys)] for i in range(n)]
            rng = random.Random(seed)
            base = {"seed": seed, "scenario": name, "partition": part, "local_epochs": epochs, "clients": n,
                    "classes_per_client": cpc if part == "shards" else None}
            jobs = [(c.kind, c.budget, c) for c in server.models]
            if full_baseline:
                jobs.append(("full", None, None))
            for kind, budget, c in jobs:
                if c is None:
                    m, who = server.full_model(), list(range(n))
                    costs = {"macs": server.full["macs"], "params": server.full["params"],
                             "peak_activation_bytes": server.full["peak_activation_bytes"]}
                else:
                    m = copy.deepcopy(c.model)
                    who = [i for i in range(n) if member[i] == tuple(sorted(budget.items()))]
                    costs = {"macs": c.macs, "params": c.params, "peak_activation_bytes": c.peak_activation_bytes}
                acc = _fedavg(m, who, sets, test_loader, rounds, epochs, lr, momentum, batch_size, rng, seed)
                rows.append({**base, "model": kind, "budget": budget, "members": who, **costs,
                             "accuracy": acc[-1], "curve": acc})
                say(f"seed {seed} {name} N={n} {kind} {budget or ''}: accuracy {acc[-1]:.4f}")
    return {"seed": seed, "full": server.full,
            "server_models": [{k: v for k, v in c.summary().items() if k not in ("clients", "accuracy",
                                                                                "final_accuracy")}
                              for c in server.models],
            "dac_history": server.history, "rows": rows, "seconds": time.perf_counter() - t0}
