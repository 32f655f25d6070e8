"""Why DAC's 0.1 gate threshold does not fire, measured: Algorithm 1 on the server only, for
several gate learning rates, recording per round where the live gates stand and whether the
threshold rule or the guard removed the channels.

The reason, in closed form. With ``p = softmax(w)`` over a block's C gates, the entropy's
gradient is ``dH/dw_i = -p_i (log p_i + H) = -p_i (w_i - sum_j p_j w_j)``. At the start every
gate is 1, so ``p`` is uniform and the gradient is exactly 0 (uniform is the entropy's
maximum, a stationary point); near it ``dH/dw_i ~ -(w_i - mean w) / C``, so lambda1 * L_entropy
only amplifies existing spread, at a rate ``lr * lambda1 / C`` per step (1e-5 for lr 0.01, C
about 100). Within [0, 1] the bound loss is 0. Gates therefore move by the cross-entropy
gradient alone, and at the weights' learning rate (0.01) a few hundred steps leave them within a
few hundredths of 1: the threshold at 0.1 is out of reach unless the gates learn much faster
than the weights (``gate_lr``), which this study measures.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from slimkern.prune.dac import dac_compress
from slimkern.prune.dac_federated import _loader
from slimkern.prune.fedavg import accuracy, local_sgd
from slimkern.prune.groups import as_slim_net

__all__ = ["dac_gate_study"]


def dac_gate_study(model: nn.Module, budgets: Sequence[dict], train: Dataset, test: Dataset, *, input_size,
                   gate_lrs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), reference_fraction: float = 0.2,
                   batch_size: int = 32, pretrain_epochs: int = 5, pretrain_lr: float = 0.05,
                   dac_options: dict | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> dict:
    """One seed: pre-train on the reference data (``reference_fraction`` of ``train``), then run
    ``dac_compress`` from the same pre-trained net once per gate learning rate.

    Returns ``{"seed", "pretrained_accuracy", "runs": [{"gate_lr", "budgets": [...], "history"}]}``;
    per budget the compressed model's test accuracy (without federated training), its MACs and
    params, and how many rounds / channels the threshold rule and the guard each accounted for.
    """
    if not gate_lrs or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 for g in gate_lrs):
        raise ValueError(f"dac_gate_study: gate_lrs must be a non-empty list of numbers > 0, got {gate_lrs!r}")
    if not 0 < reference_fraction < 1:
        raise ValueError(f"dac_gate_study: reference_fraction must be in (0, 1), got {reference_fraction}")
    say = log or (lambda s: None)
    perm = np.random.default_rng(seed).permutation(len(train))
    ref = Subset(train, perm[:int(round(reference_fraction * len(perm)))].tolist())
    ref_loader, test_loader = _loader(ref, batch_size, seed + 1), _loader(test, 256, 0, shuffle=False)
    torch.manual_seed(seed)
    net = copy.deepcopy(as_slim_net(model, "dac_gate_study"))
    local_sgd(net, ref_loader, pretrain_epochs, pretrain_lr, 0.9)
    pre = accuracy(net, test_loader)
    out = {"seed": seed, "pretrained_accuracy": pre, "runs": []}
    for g in gate_lrs:
        t0 = time.perf_counter()
        res = dac_compress(net, budgets, ref_loader, input_size=input_size, seed=seed,
                           **{**(dac_options or {}), "gate_lr": float(g)})
        hist = sorted((h for r in res for h in r.history), key=lambda h: h["round"])
        per_budget = []
        for r in res:
            thr = [h for h in r.history if h["by"] == "threshold"]
            per_budget.append({"budget": r.budget.as_dict(), "macs": r.macs, "params": r.params, "rounds": r.rounds,
                               "threshold_rounds": len(thr), "threshold_channels": sum(h["removed"] for h in thr),
                               "guard_channels": sum(h["removed"] for h in r.history if h["by"] != "threshold"),
                               "accuracy": accuracy(r.model, test_loader)})
        thr = [h for h in hist if h["by"] == "threshold"]
        out["runs"].append({"gate_lr": float(g), "budgets": per_budget, "history": hist, "rounds": len(hist),
                            "threshold_rounds": len(thr), "threshold_channels": sum(h["removed"] for h in thr),
                            "guard_channels": sum(h["removed"] for h in hist if h["by"] != "threshold"),
                            "final_gate_min": hist[-1]["gate_min"] if hist else None,
                            "seconds": time.perf_counter() - t0})
        say(f"seed {seed} gate_lr {g:g}: " + "; ".join(
            f"{b['budget']}: {b['threshold_channels']} channels by threshold, {b['guard_channels']} by guard, "
            f"accuracy {b['accuracy']:.4f}" for b in per_budget))
    return out
