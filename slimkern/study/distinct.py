"""The naive choice of the proposal: one *distinct* model per device tier, FedAvg inside each
tier, FedDF across tiers (Lin et al., NeurIPS 2020, heterogeneous setting: every
architecture's FedAvg model is a student of the ensemble of *all* received client models).

``simulate`` fuses one shared model (or, for ``clustered``, calls its server step once per
group with that group's replies only), so the cross-architecture ensemble needs its own
round loop; it runs the same client code (``slimkern.fl.client.local_train`` under the
``fedavg`` rule's hooks, SGD momentum 0.9, weight decay 5e-4, cosine lr over rounds) and
the same evaluation (BN statistics calibrated on the server split, top-1 on the test split).
"""
from __future__ import annotations

import copy
import math
import random
import time

import numpy as np
import torch

from slimkern.fl.feddf import FedDF, Teacher

__all__ = ["run_distinct"]


def run_distinct(models: dict, clients, train, test, calib, *, rounds: int, local_epochs: int, lr: float,
                 batch_size: int, seed: int, feddf: FedDF | None, eval_every: int = 1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, log=None) -> dict:
    """Federated training of ``models`` (tier name -> its own net, run at ``[1.0]``).

    Every round each client trains a copy of its tier's model, each tier's model becomes the
    sample-weighted mean of its clients' parameters (FedAvg; BN statistics never travel),
    then, with ``feddf``, every tier's model is distilled from all clients' models.
    Returns ``{"rounds": [{"round", "tier_accuracy", "bytes", "server_time", "server_macs"}]}``.
    """
    from slimkern.fl.client import local_train
    from slimkern.fl.rules import get_rule
    from slimkern.study.common import accuracy, calibrate
    from slimkern.switch import Switch

    rule = get_rule("fedavg")  # default client hooks: plain cross-entropy, no clipping
    full = Switch([1.0])
    X, Y = train
    elsize = 4
    sizes = {t: sum(p.numel() for p in m.parameters()) for t, m in models.items()}
    out = {"rounds": []}
    for r in range(rounds):
        t0 = time.perf_counter()
        lr_r = lr * 0.5 * (1 + math.cos(math.pi * r / rounds))
        teachers, nbytes = [], {t: 0 for t in models}
        for tier, model in models.items():
            replies = []
            for c in (c for c in clients if c.tier == tier):
                m = copy.deepcopy(model)
                gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, r, c.id, 7]).integers(2 ** 62)))
                local_train(m, X, Y, c.indices, full, rule, local_epochs, lr_r, batch_size, momentum, weight_decay,
                            gen, random.Random(hash((seed, r, c.id)) & 0xFFFFFFFF))
                replies.append((m, float(len(c.indices))))
                nbytes[tier] += 2 * sizes[tier] * elsize
            if replies:
                total = sum(n for _, n in replies)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(sum(n * dict(m.named_parameters())[name] for m, n in replies) / total)
            teachers += [Teacher(m, None, n) for m, n in replies]
        t_server = time.perf_counter()
        macs = 0
        if feddf is not None and teachers:  # one ensemble, every tier's model a student
            for rep in feddf.distill_many([(m, None) for m in models.values()], teachers, r):
                macs += rep.server_macs or 0
        server_time = time.perf_counter() - t_server
        acc = {}
        if (r + 1) % eval_every == 0 or r == rounds - 1:
            for tier, model in models.items():
                calibrate(model, calib[0])
                acc[tier] = accuracy(model, *test)
            if log is not None:
                log(f"round {r}: " + ", ".join(f"{t} {a:.3f}" for t, a in acc.items()))
        out["rounds"].append({"round": r, "tier_accuracy": acc, "bytes": nbytes, "server_time": server_time,
                              "server_macs": macs, "wall_time": time.perf_counter() - t0})
    return out
