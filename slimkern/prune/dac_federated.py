"""DAC's clustering-based federated learning (Li & Sanyal, Figure 1 and section 4.2).

1. Clients send their budgets; the server pre-trains the net on its reference data and runs
   DAC (``dac_compress``, Algorithm 1) once per distinct budget.
2. Clients with the same budget form a cluster; the server sends each its architecture (the
   compressed model).
3. Each cluster runs FedAvg on its own architecture: every round each client trains locally
   (SGD, lr 0.01, momentum 0.5 as the paper; a fixed number of local epochs, or one drawn per
   client and round from {3, 4, 5} with ``local_epochs="random"``), and the server averages
   the cluster's models weighted by the clients' sample counts.

With ``width_baselines=True`` every budget also gets a uniform width-multiplier model of equal
cost (``width_baseline``), carved from the same pre-trained net, given as many epochs on the
reference data as DAC spent reaching that budget (same lr and momentum), then trained by the
same clustered FedAvg: the paper's Figure 3 comparison.
"""
from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from slimkern.profile import profile
from slimkern.prune.budget import parse_budgets
from slimkern.prune.channels import prune_channels
from slimkern.prune.cost import pruned_profile
from slimkern.prune.dac import dac_compress
from slimkern.prune.fedavg import accuracy, average_states, local_sgd
from slimkern.prune.groups import as_slim_net
from slimkern.prune.width_baseline import width_for_budget

__all__ = ["ClusterResult", "DACFederatedResult", "DACServerModels", "dac_federated", "dac_server"]


@dataclass
class ClusterResult:
    kind: str  # "dac" or "width"
    budget: dict
    clients: list[int]
    macs: int
    params: int
    peak_activation_bytes: int
    accuracy: list[float] = field(default_factory=list)  # test accuracy after each round (index 0: before FL)
    width: float | None = None
    keep: dict | None = field(default=None, repr=False)  # kept channels per group
    model: nn.Module | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {"kind": self.kind, "budget": self.budget, "clients": self.clients, "macs": self.macs,
                "params": self.params, "peak_activation_bytes": self.peak_activation_bytes,
                "accuracy": self.accuracy, "final_accuracy": self.accuracy[-1] if self.accuracy else None,
                "width": self.width, "keep": self.keep}


@dataclass
class DACFederatedResult:
    full: dict  # the unpruned net: macs, params, peak, accuracy after pre-training
    clusters: list[ClusterResult]
    seconds: float
    dac_history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"full": self.full, "clusters": [c.summary() for c in self.clusters], "seconds": self.seconds,
                "dac_history": self.dac_history}


def _loader(ds, batch_size, seed, shuffle=True):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _fedavg(model: nn.Module, clients: list[int], client_sets, test_loader, rounds, local_epochs, lr, momentum,
            batch_size, rng: random.Random, seed: int) -> list[float]:
    acc = [accuracy(model, test_loader)]
    sizes = [len(client_sets[c]) for c in clients]
    for r in range(rounds):
        states = []
        for c in clients:
            local = copy.deepcopy(model)
            e = rng.choice((3, 4, 5)) if local_epochs == "random" else local_epochs
            local_sgd(local, _loader(client_sets[c], batch_size, seed * 1000 + r * 100 + c), e, lr, momentum)
            states.append(local.state_dict())
        model.load_state_dict(average_states(states, sizes))
        acc.append(accuracy(model, test_loader))
    return acc


def _budget_keys(client_budgets: Sequence[dict]) -> list[tuple]:
    for i, b in enumerate(client_budgets):
        if not isinstance(b, dict) or not b:
            raise TypeError(f"dac_federated: client {i}'s budget must be a non-empty dict like {{'macs_ratio': 0.5}}, "
                            f"got {b!r}")
    return [tuple(sorted(b.items())) for b in client_budgets]


@dataclass
class DACServerModels:
    """What the server sends out: per budget the DAC model (and its equal-cost width-multiplier
    baseline), the pre-trained net they were carved from, and Algorithm 1's round history."""

    full: dict
    models: list[ClusterResult]
    history: list[dict]
    net: nn.Module = field(repr=False)

    def full_model(self) -> nn.Module:
        """A fresh plain copy of the pre-trained 1.0x model."""
        return prune_channels(self.net, {})


def dac_server(model: nn.Module, budgets: Sequence[dict], reference: Dataset, test: Dataset, *, input_size,
               batch_size: int = 32, pretrain_epochs: int = 3, pretrain_lr: float = 0.05,
               width_baselines: bool = True, dac_options: dict | None = None, seed: int = 0,
               log: Callable[[str], None] | None = None) -> DACServerModels:
    """The server's half of DAC's federated scheme: pre-train ``model`` (a copy) on the reference
    data, run Algorithm 1 once for the distinct ``budgets`` and, with ``width_baselines``, carve
    and train the equal-cost width-multiplier models. The returned models have empty ``clients``
    and ``accuracy``; ``dac_federated`` and ``dac_client_sweep`` run the clusters' FedAvg on them."""
    say = log or (lambda s: None)
    budgets = [dict(k) for k in dict.fromkeys(_budget_keys(budgets))]
    torch.manual_seed(seed)
    net = copy.deepcopy(as_slim_net(model, "dac_federated"))
    test_loader = _loader(test, 256, 0, shuffle=False)
    ref_loader = _loader(reference, batch_size, seed + 1)
    full_prof = profile(net.eval(), input_size=input_size)
    parsed = parse_budgets(budgets, full_prof.macs, full_prof.params)  # validates before any training
    local_sgd(net, ref_loader, pretrain_epochs, pretrain_lr, 0.9)
    full = {"macs": full_prof.macs, "params": full_prof.params, "peak_activation_bytes": full_prof.peak_activation_bytes,
            "accuracy": accuracy(net, test_loader)}
    say(f"pre-trained full model: accuracy {full['accuracy']:.4f}, {full['macs']:,} MACs")
    results = dac_compress(net, budgets, ref_loader, input_size=input_size, seed=seed, log=log,
                           **(dac_options or {}))
    models: list[ClusterResult] = []
    history: list[dict] = []
    opts = dac_options or {}
    for b, pb, res in zip(budgets, parsed, results):
        history += res.history
        say(f"budget {b}: DAC model {res.macs:,} MACs, {res.params:,} params")
        models.append(ClusterResult("dac", b, [], res.macs, res.params, res.peak_activation_bytes, keep=res.keep,
                                    model=res.model))
        if width_baselines:
            w, keep = width_for_budget(net, pb, input_size)
            wm = prune_channels(net, keep)
            # the same server-side training DAC's model had on the reference data (its rounds so far)
            dac_epochs = (res.history[-1]["round"] if res.history else 0) * opts.get("epochs_per_round", 1)
            dac_epochs += opts.get("finetune_epochs", 1)
            local_sgd(wm, ref_loader, dac_epochs, opts.get("lr", 0.01), opts.get("momentum", 0.9))
            p = pruned_profile(net, keep, input_size)
            models.append(ClusterResult("width", b, [], p.macs, p.params, p.peak_activation_bytes, width=w,
                                        keep={g: list(v) for g, v in keep.items()}, model=wm))
    return DACServerModels(full, models, history, net)


def dac_federated(model: nn.Module, client_budgets: Sequence[dict], client_sets: Sequence[Dataset],
                  reference: Dataset, test: Dataset, *, input_size, rounds: int = 5, local_epochs=1,
                  lr: float = 0.01, momentum: float = 0.5, batch_size: int = 32, pretrain_epochs: int = 3,
                  pretrain_lr: float = 0.05, width_baselines: bool = True, full_baseline: bool = False,
                  dac_options: dict | None = None,
                  seed: int = 0, log: Callable[[str], None] | None = None) -> DACFederatedResult:
    """DAC + clustered FedAvg (module docstring).

    Args:
        model: the net to compress (e.g. ``slimkern.models.mobilenet_v2``); not changed.
        client_budgets: one budget per client (``slimkern.prune.budget`` format); equal budgets
            form a cluster.
        client_sets: one dataset per client (e.g. from ``slimkern.fl.partition``).
        reference: the server's reference data (pre-training and DAC).
        test: the held-out test set every cluster model is scored on after each round.
        rounds, local_epochs (int or ``"random"``), lr, momentum, batch_size: the FedAvg loop.
        pretrain_epochs, pretrain_lr: server pre-training on ``reference`` before DAC.
        dac_options: keyword arguments for ``dac_compress`` (threshold, guard_fraction, ...).
        full_baseline: also run the unpruned 1.0x model through FedAvg over all clients
            (``full["fl_accuracy"]``, per round): the accuracy the compressed models are held to.
    """
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    if len(client_budgets) != len(client_sets) or not client_sets:
        raise ValueError(f"dac_federated: need one budget per client, got {len(client_budgets)} budgets for "
                         f"{len(client_sets)} clients")
    if local_epochs != "random" and (isinstance(local_epochs, bool) or not isinstance(local_epochs, int)
                                     or local_epochs < 1):
        raise ValueError(f"dac_federated: local_epochs must be an int >= 1 or 'random', got {local_epochs!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"dac_federated: rounds must be an int >= 0, got {rounds!r}")
    rng = random.Random(seed)
    test_loader = _loader(test, 256, 0, shuffle=False)
    keys = _budget_keys(client_budgets)
    unique = list(dict.fromkeys(keys))
    members = {k: [i for i, kk in enumerate(keys) if kk == k] for k in unique}
    server = dac_server(model, [dict(k) for k in unique], reference, test, input_size=input_size,
                        batch_size=batch_size, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
                        width_baselines=width_baselines, dac_options=dac_options, seed=seed, log=log)
    full = server.full
    if full_baseline:  # the 1.0x model through the same FedAvg, on every client: the reference accuracy
        full["fl_accuracy"] = _fedavg(server.full_model(), list(range(len(client_sets))), client_sets, test_loader,
                                      rounds, local_epochs, lr, momentum, batch_size, random.Random(seed), seed)
        say(f"1.0x model, FedAvg over all clients: accuracy {full['fl_accuracy'][-1]:.4f}")
    clusters: list[ClusterResult] = []
    for c in server.models:
        c.clients = members[tuple(sorted(c.budget.items()))]
        c.accuracy = _fedavg(c.model, c.clients, client_sets, test_loader, rounds, local_epochs, lr, momentum,
                             batch_size, rng, seed)
        clusters.append(c)
        say(f"cluster {c.budget}: {c.kind} model {c.macs:,} MACs, clients {c.clients}: accuracy {c.accuracy[-1]:.4f}")
    for c in clusters:
        c.model.eval()
    return DACFederatedResult(full, clusters, time.perf_counter() - t0, server.history)
