"""DAC Algorithm 1: one physically compressed model per resource budget.

Li & Sanyal, "Heterogeneous Federated Learning with Differentiable Architecture Compression",
Algorithm 1: for budget ``(M_i, P_i)``,

    while MACs >= M_i or params >= P_i:
        train the gated net on the server's reference data with
            CE + lambda1 * L_entropy + lambda2 * L_bound          (slimkern.prune.dac_losses)
        remove the channels whose gate w_ij <= threshold (0.1)

The gates multiply the input channels of every block's depthwise conv
(``slimkern.prune.gates``). A removed channel is masked to zero on its whole width group
(``apply_masks``), so the net being trained computes exactly the compressed model, which is
built at the end by folding the gates into the depthwise filters and ``prune_channels``.

Guard (the paper has none): when a round removes nothing because no gate is below the
threshold, the ``guard_fraction`` lowest-gated live channels of the most expensive gated
group (the largest MACs summed over the layers writing or reading it) are removed instead.
Every round therefore removes at least one channel; a budget below the smallest reachable
model (every gated group at one channel) is refused up front, and ``max_rounds`` bounds the
loop with a clear error.

Budgets are processed from the loosest to the tightest, each continuing from the state that
met the previous one: the loop for a tighter budget passes through that state anyway, so this
is Algorithm 1 run once per budget without repeating the shared prefix.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimkern.prune.budget import Budget, parse_budgets
from slimkern.prune.channels import prune_channels
from slimkern.prune.cost import pruned_profile
from slimkern.prune.flops import FlopsModel
from slimkern.prune.dac_losses import DEFAULT_LAMBDA_BOUND, DEFAULT_LAMBDA_ENTROPY, bound_loss, entropy_loss
from slimkern.prune.gates import DepthwiseGates
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.prune.masks import apply_masks

__all__ = ["DACResult", "dac_compress", "DACState"]


@dataclass
class DACResult:
    """One compressed model: ``model`` is a plain ``torch.fx.GraphModule`` (eval mode);
    ``keep`` the kept channels per group; costs measured by ``slimkern.profile``."""

    budget: Budget
    model: fx.GraphModule
    keep: dict[str, list[int]]
    macs: int
    params: int
    peak_activation_bytes: int
    rounds: int
    history: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"budget": self.budget.as_dict(), "macs": self.macs, "params": self.params,
                "peak_activation_bytes": self.peak_activation_bytes, "rounds": self.rounds,
                "kept_channels": {g: len(k) for g, k in self.keep.items()}}


class DACState:
    """The gated, masked net Algorithm 1 trains: ``net`` (a private copy), ``gates`` and
    ``alive`` (0/1 per gated group). ``forward`` runs the net as the compressed model."""

    def __init__(self, net: nn.Module, init: float = 1.0):
        self.net = net
        self.groups = channel_groups(net, "dac")
        self.gates = DepthwiseGates(net, init, self.groups)
        self.alive = {n: torch.ones(self.groups[n].channels) for n in self.gates.names}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with apply_masks(self.net, self.alive, self.groups), self.gates.attach(self.net, self.alive):
            return self.net(x)

    def keep(self) -> dict[str, torch.Tensor]:
        return {n: torch.nonzero(a).flatten() for n, a in self.alive.items()}

    def live_gates(self) -> list[torch.Tensor]:
        return [w[a.bool()] for w, a in zip(self.gates.as_list(), self.alive.values())]

    def compressed(self) -> fx.GraphModule:
        net = copy.deepcopy(self.net)
        self.gates.fold_into(net)
        return prune_channels(net, self.keep()).eval()

    def remove_below(self, threshold: float) -> int:
        """Kills live channels with gate <= threshold (each group keeps its largest gate)."""
        n = 0
        with torch.no_grad():
            for w, (g, a) in zip(self.gates.as_list(), self.alive.items()):
                kill = (w <= threshold) & a.bool()
                if bool(kill.all()) or int(a.sum()) - int(kill.sum()) < 1:
                    best = torch.where(a.bool(), w, torch.full_like(w, -math.inf)).argmax()
                    kill[best] = False
                a[kill] = 0
                n += int(kill.sum())
        return n

    def remove_lowest(self, group: str, k: int) -> int:
        a = self.alive[group]
        w = self.gates.as_dict()[group].detach()
        k = min(k, int(a.sum()) - 1)
        if k <= 0:
            return 0
        order = torch.where(a.bool(), w, torch.full_like(w, math.inf)).argsort()[:k]
        a[order] = 0
        return k


def _group_macs(fm: FlopsModel, state: DACState) -> dict[str, float]:
    per_layer = fm.layer_macs(state.alive)
    out = {}
    for n in state.gates.names:
        g = state.groups[n]
        out[n] = sum(per_layer.get(name, 0) for name in g.producers + g.depthwise + g.consumers)
    return out


def _validate(lambda_entropy, lambda_bound, threshold, guard_fraction, epochs_per_round, max_rounds, lr, gate_lr):
    for k, v in {"lambda_entropy": lambda_entropy, "lambda_bound": lambda_bound}.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"dac_compress: {k} must be a number >= 0, got {v!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"dac_compress: threshold must be in [0, 1), got {threshold!r}")
    if isinstance(guard_fraction, bool) or not isinstance(guard_fraction, (int, float)) or not 0 < guard_fraction <= 1:
        raise ValueError(f"dac_compress: guard_fraction must be in (0, 1], got {guard_fraction!r}")
    for k, v in {"epochs_per_round": epochs_per_round, "max_rounds": max_rounds}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "epochs_per_round" else 1):
            raise ValueError(f"dac_compress: {k} must be an int >= {0 if k == 'epochs_per_round' else 1}, got {v!r}")
    for k, v in {"lr": lr, "gate_lr": gate_lr}.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ValueError(f"dac_compress: {k} must be > 0, got {v!r}")


def dac_compress(model: nn.Module, budgets, loader: Iterable, *, input_size=(1, 3, 32, 32),
                 epochs_per_round: int = 1, finetune_epochs: int = 1, lr: float = 0.01, momentum: float = 0.9,
                 gate_lr: float | None = None, lambda_entropy: float = DEFAULT_LAMBDA_ENTROPY,
                 lambda_bound: float = DEFAULT_LAMBDA_BOUND, threshold: float = 0.1, guard_fraction: float = 0.1,
                 max_rounds: int = 100, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> list[DACResult]:
    """DAC Algorithm 1 (see the module docstring): one compressed model per budget.

    Args:
        model: the (pre-trained) net: ``slimkern.models`` / ``slimmify`` output or a plain model
            with depthwise convs (MobileNet-v2); not changed (a copy is trained).
        budgets: list of ``{"macs": M, "params": P}`` (counts, either key optional) or
            ``{"macs_ratio": r, "params_ratio": q}`` (fractions of ``model``), see
            ``slimkern.prune.budget``. Costs are ``slimkern.profile`` at ``input_size``.
        loader: the server's reference data, an iterable of ``(x, y)`` batches.
        epochs_per_round: training epochs before each removal; ``finetune_epochs`` more after a
            budget is met (0: none), before its model is built.
        lr, momentum: SGD on the weights; ``gate_lr`` (default ``lr``) on the gates.
        lambda_entropy, lambda_bound: DAC's lambda1, lambda2 (paper: 0.1, 0.01).
        threshold: gates ``<= threshold`` are removed (paper: 0.1).
        guard_fraction, max_rounds: the guard (module docstring).

    Returns a list of ``DACResult`` in the order of ``budgets``, each meeting its budget.
    Raises ValueError for bad budgets (also: below the smallest reachable model) and
    RuntimeError when ``max_rounds`` pass without meeting a budget.
    """
    _validate(lambda_entropy, lambda_bound, threshold, guard_fraction, epochs_per_round, max_rounds, lr, gate_lr)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"dac_compress: finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    net = copy.deepcopy(as_slim_net(model, "dac_compress"))
    state = DACState(net)
    fm = FlopsModel(net, input_size)  # profile's closed forms on the kept counts, cheap per round
    parsed = parse_budgets(budgets, fm.total, fm.total_params)
    s_macs, s_params = fm.hard_cost({n: [0] for n in state.gates.names})
    for i, b in enumerate(parsed):
        if not b.met(s_macs, s_params):
            raise ValueError(f"dac_compress: budget {i} ({b}) is below the smallest reachable model (every gated "
                             f"block at one channel: {s_macs:,} MACs, {s_params:,} params)")
    say = log or (lambda s: None)
    torch.manual_seed(seed)
    opt = torch.optim.SGD([{"params": list(net.parameters()), "lr": lr},
                           {"params": state.gates.as_list(), "lr": gate_lr or lr}], lr=lr, momentum=momentum)

    def train(epochs: int) -> float:
        net.train()
        total, n = 0.0, 0
        for _ in range(epochs):
            for x, y in loader:
                out = state(x)
                loss = (F.cross_entropy(out, y) + lambda_entropy * entropy_loss(state.live_gates())
                        + lambda_bound * bound_loss(state.live_gates()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()) * len(y), n + len(y)
        return total / max(n, 1)

    order = sorted(range(len(parsed)), key=lambda i: (-(parsed[i].macs or math.inf), -(parsed[i].params or math.inf)))
    results: dict[int, DACResult] = {}
    rounds = 0
    history: list[dict] = []
    for i in order:
        b = parsed[i]
        macs, params = fm.hard_cost(state.keep())
        start = rounds
        while not b.met(macs, params):
            if rounds - start >= max_rounds:
                raise RuntimeError(f"dac_compress: budget {i} ({b}) not met after {max_rounds} rounds "
                                   f"(now {macs:,} MACs, {params:,} params); raise max_rounds")
            t0 = time.perf_counter()
            loss = train(epochs_per_round)
            with torch.no_grad():  # where the live gates stand when the threshold rule is applied
                live_w = torch.cat([w.detach() for w in state.live_gates()])
                gate_stats = {"gate_min": float(live_w.min()), "gate_mean": float(live_w.mean()),
                              "gate_max": float(live_w.max()), "gate_spread": float(live_w.std(unbiased=False))}
            removed, how = state.remove_below(threshold), "threshold"
            if removed == 0:
                costs = _group_macs(fm, state)
                live = [g for g in state.gates.names if int(state.alive[g].sum()) > 1]
                if not live:  # cannot happen after the reachability check; kept as a clear error
                    raise RuntimeError(f"dac_compress: every gated block is at one channel and budget {i} ({b}) "
                                       "is still not met")
                g = max(live, key=lambda n: costs[n])
                k = max(1, math.ceil(guard_fraction * int(state.alive[g].sum())))
                removed, how = state.remove_lowest(g, k), f"guard:{g}"
            rounds += 1
            macs, params = fm.hard_cost(state.keep())
            history.append({"round": rounds, "budget": i, "loss": loss, "removed": removed, "by": how,
                            "macs": macs, "params": params, **gate_stats, "seconds": time.perf_counter() - t0})
            say(f"DAC round {rounds} (budget {i}): loss {loss:.4f}, removed {removed} by {how}, "
                f"{macs:,} MACs, {params:,} params")
        if finetune_epochs:
            train(finetune_epochs)
        comp = state.compressed()
        prof = pruned_profile(net, state.keep(), input_size)  # the reported costs: slimkern.profile itself
        assert (prof.macs, prof.params) == (macs, params), "closed-form cost disagrees with slimkern.profile"
        keep = {g: k.tolist() for g, k in state.keep().items()}
        results[i] = DACResult(b, comp, keep, prof.macs, prof.params, prof.peak_activation_bytes, rounds - start,
                               [h for h in history if h["budget"] == i])
    return [results[i] for i in range(len(parsed))]
