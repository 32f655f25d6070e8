"""Training for width search: the search phase (non-uniform sandwich, OWS/AOWS sampling and
unary statistics) and the retrain phase on the found configurations (Wang & Blaschko, Sec. 4).

Search phase (:class:`WidthSearchTrainer`, AOWS's ``train_nas.py`` recipe): every step runs the
widest configuration (cross-entropy with the labels), the narrowest and one sampled
configuration (soft cross-entropy against the widest's probabilities, in-place distillation),
all in one packed pass. The sampled configuration is uniform over each layer's choices (OWS) or,
after the warm-up, drawn from the smoothed-Viterbi marginals of a platform picked with
probability ``nu_k`` (AOWS, :class:`~slimkern.nas.AOWSSampler`). Each image's hard losses of the
sampled and widest configurations feed the :class:`~slimkern.nas.UnaryStats`, saved in the
checkpoint.

Retrain phase (:class:`ConfigTrainer`): a slimmable net trained on a fixed set of switches (the
configurations found per platform, or uniform widths for the Slim baselines): each step runs
the largest (labels), the smallest and one switch drawn uniformly (``-U``) or by platform
weight (``-W``) (distilled from the largest).

BN rows: a switchable BN keeps one statistics row per switch; the search phase meets a new
per-layer switch at almost every step, so the rows of sampled configurations are dropped
after their step (their training-mode batch statistics are all the step needs).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from slimkern.nas.costs import CostModel, cost_model
from slimkern.nas.platforms import check_platforms
from slimkern.nas.search import AOWSSampler
from slimkern.nas.space import SearchSpace
from slimkern.nas.unary import UnaryStats
from slimkern.switch import Switch
from slimkern.train.losses import kd_loss
from slimkern.train.trainer import Trainer

__all__ = ["ConfigTrainer", "WidthSearchTrainer", "drop_bn_rows"]


class _Clipped:
    """``clip_grad_norm``: rescale the gradient to at most this L2 norm before each step (None: off)."""

    clip_grad_norm: float | None = None

    def _set_clip(self, clip):
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0):
            raise ValueError(f"clip_grad_norm must be a number > 0 or None, got {clip!r}")
        self.clip_grad_norm = None if clip is None else float(clip)

    def train_step(self, x, y):
        if self.clip_grad_norm is None:
            return super().train_step(x, y)
        self.net.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = self.loss(x, y)
        if not torch.isfinite(total):
            raise FloatingPointError(f"{self.name}: non-finite loss {total.item()} at step {self.global_step}; "
                                     "lower the lr")
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def drop_bn_rows(net, switches: Sequence[Switch]) -> int:
    """Removes the BN statistics rows of ``switches`` from every switchable BN of ``net``;
    returns the number of rows removed (per layer, summed)."""
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    from slimkern.nn.switching import _apply, _current_plan

    drop = set(switches)
    removed = 0
    for m in net.modules():
        if not isinstance(m, _SwitchableBatchNorm):
            continue
        keep = [i for i, s in enumerate(m.switches) if s not in drop]
        if len(keep) == len(m.switches):
            continue
        idx = torch.tensor(keep, dtype=torch.long, device=m.running_mean.device)
        m.running_mean = m.running_mean.index_select(0, idx)
        m.running_var = m.running_var.index_select(0, idx)
        m.num_batches_tracked = m.num_batches_tracked.index_select(0, idx)
        removed += len(m.switches) - len(keep)
        m.switches = [m.switches[i] for i in keep]
    if removed:
        _apply(net, _current_plan(net))  # row indices moved: re-derive the tables
    return removed


class _UniformSampler:
    """OWS sampling without a cost model: every group draws a choice uniformly."""

    last_temperature = None

    def __init__(self, space: SearchSpace, generator: torch.Generator):
        self.space, self.generator = space, generator

    def sample(self, epoch: float):
        return 0, [int(torch.randint(len(c), (1,), generator=self.generator)) for c in self.space.choices]


class WidthSearchTrainer(_Clipped, Trainer):
    """The search phase of OWS (``adaptive=False``) or AOWS (``adaptive=True``).

    Args:
        net: a slimkern net; AOWS needs its width groups to form a chain, OWS (uniform sampling
            with unary statistics) runs on any net with ``search_space(net, require_chain=False)``.
        space: its :class:`SearchSpace` (``slimkern.nas.search_space``).
        platforms: target platforms (their weights are AOWS's ``nu_k``; budgets fix ``gamma_k``).
        epochs: the planned number of epochs (the temperature schedule ends there).
        adaptive: AOWS sampling after ``warmup`` epochs; False: OWS (uniform).
        input_size: for the cost model (AOWS needs resource tables), e.g. ``(1, 3, 32, 32)``;
            with neither ``input_size`` nor ``costs``, OWS runs without a cost model.
        window, attribution: of the :class:`UnaryStats`.
        costs: a prebuilt :class:`CostModel` (else built from ``input_size``).
        schedule: AOWS temperature set points (default ``aows_schedule(epochs, warmup)``).
        temperature: distillation temperature.
        clip_grad_norm: clip the gradient's L2 norm (None: no clipping, as AOWS).
        **kw: :class:`slimkern.train.Trainer` options (lr, schedule, seed, checkpoint, ...).
    """

    name = "width-search"

    def __init__(self, net, space: SearchSpace, platforms, epochs: int, *, adaptive: bool = False, warmup: int = 5,
                 input_size=None, window: int = 100000, attribution: str = "aows", costs: CostModel | None = None,
                 schedule=None, temperature: float = 1.0, clip_grad_norm: float | None = None, **kw):
        super().__init__(net, **kw)
        self._set_clip(clip_grad_norm)
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace (slimkern.nas.search_space(net)), got {type(space).__name__}")
        self.space = space
        self.platforms = check_platforms(platforms, require_weights=False)
        self.stats = UnaryStats(space, window=window, attribution=attribution)
        self.adaptive = bool(adaptive)
        if costs is None and (adaptive or input_size is not None):
            if input_size is None:
                raise ValueError("AOWS (adaptive=True) needs input_size (e.g. (1, 3, 32, 32)) or a CostModel")
            costs = cost_model(net, space, input_size)
        self.costs = costs
        if costs is None:  # OWS on any net: uniform per-group sampling needs no costs
            self.sampler = _UniformSampler(space, self.generator)
        else:
            self.sampler = AOWSSampler(costs, self.stats, self.platforms, epochs, warmup=min(warmup, epochs - 1),
                                       schedule=schedule, adaptive=adaptive, generator=self.generator)
        self.temperature = temperature
        self.max_switch = space.switch(space.max_path())
        self.min_switch = space.switch(space.min_path())
        self._steps_per_epoch = 1
        self._last_path: list[int] | None = None
        self.last_platform: int | None = None

    def fit(self, data, epochs: int, batch_size: int = 64, resume: bool = False, on_epoch_end=None):
        self._steps_per_epoch = max(1, len(self.make_loader(data, batch_size)))
        return super().fit(data, epochs, batch_size, resume, on_epoch_end)

    def current_epoch(self) -> float:
        """Fractional epoch of the next step (AOWS anneals the temperature per iteration)."""
        return self.global_step / self._steps_per_epoch

    def step_switches(self) -> list:
        k, path = self.sampler.sample(self.current_epoch())
        self.last_platform, self._last_path = k, path
        sws = [self.max_switch, self.min_switch]
        sw = self.space.switch(path)
        if sw not in sws:
            sws.append(sw)
        return sws

    def compute_losses(self, switches, logits, features, y):
        z_max = logits[0]
        terms = {"ce_max": self.ce(z_max, y), "kd_min": kd_loss(logits[1], z_max, self.temperature)}
        z_rand = logits[switches.index(self.space.switch(self._last_path))]
        if len(logits) > 2:
            terms["kd_rand"] = kd_loss(z_rand, z_max, self.temperature)
        with torch.no_grad():
            loss_max = F.cross_entropy(z_max.detach(), y, reduction="none")
            loss_rand = F.cross_entropy(z_rand.detach(), y, reduction="none")
        if bool(torch.isfinite(loss_max).all()) and bool(torch.isfinite(loss_rand).all()):
            self.stats.update(self._last_path, loss_rand, loss_max)  # else the step raises FloatingPointError
        return terms

    def train_step(self, x, y):
        out = super().train_step(x, y)
        sampled = self.space.switch(self._last_path)
        if sampled not in (self.max_switch, self.min_switch):
            drop_bn_rows(self.net, [sampled])
        if self.sampler.last_temperature is not None:
            out["temperature"] = self.sampler.last_temperature
        return out

    def trained_switches(self) -> list:
        return [self.max_switch, self.min_switch]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["unary"] = self.stats.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stats.load_state_dict(state["unary"])


class ConfigTrainer(_Clipped, Trainer):
    """Slimmable retraining on fixed switches (the retrain phase; module docstring).

    Args:
        net: the slimkern net (fresh weights).
        switches: the configurations (per-layer or fraction switches), one per platform.
        weights: sampling weights of the switches (``-W``); None samples uniformly (``-U``).
        temperature: distillation temperature.
        order_key: ``switch -> size`` (e.g. its MACs) telling the largest and smallest switches.
        clip_grad_norm: clip the gradient's L2 norm (None: off).
    """

    name = "nas-retrain"

    def __init__(self, net, switches: Sequence, weights: Sequence[float] | None = None, temperature: float = 1.0,
                 order_key=None, clip_grad_norm: float | None = None, **kw):
        super().__init__(net, **kw)
        self._set_clip(clip_grad_norm)
        sws = [s if isinstance(s, Switch) else Switch.parse(s) for s in switches]
        if not sws:
            raise ValueError("ConfigTrainer needs at least one switch")
        uniq = list(dict.fromkeys(sws))
        if weights is None:
            w = [1.0] * len(sws)
        else:
            w = [float(v) for v in weights]
            if len(w) != len(sws) or any(v < 0 for v in w) or not sum(w) > 0:
                raise ValueError(f"weights must be {len(sws)} non-negative numbers with a positive sum, got {weights!r}")
        merged = {s: 0.0 for s in uniq}
        for s, v in zip(sws, w):
            merged[s] += v
        if order_key is None:
            raise ValueError("ConfigTrainer needs order_key(switch) -> size (e.g. the switch's MACs) to tell the "
                             "largest and smallest configurations")
        self.switches = sorted(uniq, key=order_key, reverse=True)
        self.weights = torch.tensor([merged[s] for s in self.switches], dtype=torch.float64)
        self.temperature = temperature

    def step_switches(self) -> list:
        sws = [self.switches[0]] + ([self.switches[-1]] if len(self.switches) > 1 else [])
        k = int(torch.multinomial(self.weights / self.weights.sum(), 1, generator=self.generator))
        if self.switches[k] not in sws:
            sws.append(self.switches[k])
        return sws

    def compute_losses(self, switches, logits, features, y):
        terms = {"ce_max": self.ce(logits[0], y)}
        for i, z in enumerate(logits[1:], start=1):
            terms["kd_min" if i == 1 else "kd_sampled"] = kd_loss(z, logits[0], self.temperature)
        return terms

    def trained_switches(self) -> list:
        return list(self.switches)
