"""Training recipes: US-Nets sandwich rule, ParaDiS Algorithm 1, and the individual-model baseline."""
from __future__ import annotations

import math

from typing import Callable, Sequence

import torch

from slimkern.train.losses import feature_mse, kd_loss
from slimkern.train.trainer import Trainer


def _as_switch(s):
    import slimkern

    if isinstance(s, slimkern.Switch):
        return s
    if isinstance(s, str):
        return slimkern.Switch.parse(s)
    if isinstance(s, (int, float)):
        return slimkern.Switch.width(float(s))
    return slimkern.Switch(list(s))


def _width(sw) -> float:
    """Total width of a switch: the sum of its branch widths (fractions of the 1.0x width)."""
    return float(sw.total_width) if not sw.is_per_layer else float("inf")


class SandwichTrainer(Trainer):
    r"""Universally slimmable training (Yu & Huang, ICCV 2019, "Universally Slimmable Networks
    and Improved Training Techniques").

    Each step runs the **sandwich rule**: the max width, the min width and ``n_random`` widths
    drawn uniformly from ``[min_width, max_width]``, all in one packed pass. The max width learns
    from the labels (cross-entropy); with ``inplace_kd`` every other width learns from the max
    width's soft predictions (in-place distillation, teacher detached):

    .. math:: \mathcal{L} = \mathrm{CE}(z_{max}, y) + \sum_{w \ne max} \mathrm{KD}(z_w, \mathrm{sg}(z_{max}))

    ``width_step`` rounds random widths to a grid (default 1/32: every width gets its own BN
    statistics row, so a finite grid keeps the rows few; None draws continuous widths). ``nonuniform=True`` draws every
    layer's width independently (a per-layer switch from ``sampler``), the "non-uniform"
    variant: pass ``sampler(generator) -> Switch``; the default sampler needs
    ``Switch.from_channels`` and the net's layer list (``layer_channels``).
    """

    name = "sandwich"

    def __init__(self, net, max_width: float = 1.0, min_width: float = 0.25, n_random: int = 2,
                 inplace_kd: bool = True, temperature: float = 1.0, width_step: float | None = 0.03125,
                 sampler: Callable[[torch.Generator], object] | None = None, **kw):
        super().__init__(net, **kw)
        if not 0 < min_width <= max_width:
            raise ValueError(f"SandwichTrainer: need 0 < min_width <= max_width, got {min_width}, {max_width}")
        if n_random < 0:
            raise ValueError(f"SandwichTrainer: n_random must be >= 0, got {n_random}")
        self.max_width, self.min_width, self.n_random = float(max_width), float(min_width), int(n_random)
        self.inplace_kd, self.temperature, self.width_step, self.sampler = inplace_kd, temperature, width_step, sampler
        if width_step and sampler is None:
            # forward_switches refuses a repeated switch: the grid must hold n_random widths
            # strictly between min and max.
            inner = math.floor((max_width - min_width) / width_step + 1e-9) + 1 - 2
            if n_random > max(0, inner):
                raise ValueError(f"SandwichTrainer: n_random={n_random} distinct random widths do not fit strictly "
                                 f"between min_width={min_width} and max_width={max_width} on a grid of {width_step}")

    def sample_width(self) -> float:
        u = float(torch.rand((), generator=self.generator))
        w = self.min_width + u * (self.max_width - self.min_width)
        if self.width_step:
            w = min(self.max_width, max(self.min_width, round(w / self.width_step) * self.width_step))
        return w

    def step_switches(self) -> list:
        import slimkern

        sws = [slimkern.Switch.width(self.max_width), slimkern.Switch.width(self.min_width)]
        if self.sampler is not None:
            return sws + [self.sampler(self.generator) for _ in range(self.n_random)]
        taken = {self.max_width, self.min_width}
        for _ in range(self.n_random):
            # Redraw a width already in the step (a grid point can come up twice); __init__
            # checked that enough free grid points exist, so this ends.
            w = self.sample_width()
            while w in taken:
                w = self.sample_width()
            taken.add(w)
            sws.append(slimkern.Switch.width(w))
        return sws

    def compute_losses(self, switches, logits, features, y):
        terms = {"ce_max": self.ce(logits[0], y)}
        for i, z in enumerate(logits[1:], start=1):
            key = "min" if i == 1 else f"rand{i - 1}"
            terms[f"kd_{key}" if self.inplace_kd else f"ce_{key}"] = (
                kd_loss(z, logits[0], self.temperature) if self.inplace_kd else self.ce(z, y))
        return terms

    def trained_switches(self) -> list:
        import slimkern

        return [slimkern.Switch.width(self.max_width), slimkern.Switch.width(self.min_width)]

    def teacher_term(self) -> str:
        return "ce_max"


class ParaDiSTrainer(Trainer):
    r"""ParaDiS training, Algorithm 1 of Ozerov, Lambert & Kumaraswamy, "ParaDiS: Parallelly
    Distributable Slimmable Neural Networks" (arXiv:2110.02724).

    All switches (e.g. ``[1.2], [1.0], [0.5,0.5], [4x0.25]``) are updated at every step, in one
    packed pass. With the wide teacher :math:`w` (largest total width, e.g. ``[1.2]``), the full
    switch :math:`f = [1.0]` and every other switch :math:`s`:

    .. math::
        \mathcal{L} = \mathrm{CE}(z_w, y) + \mathrm{KD}(z_f, \mathrm{sg}(z_w))
           + \sum_s \Big[\mathrm{KD}(z_s, \mathrm{sg}(z_w))
           + \beta\, \mathrm{MSE}\big(\mathrm{pad}(h_s), \mathrm{sg}(\mathrm{pad}(h_f))\big)\Big]

    where :math:`h` are the features entering the classifier, zero-padded to the full width
    (a ParaDiS switch's branches tile the channels, so its features line up with ``[1.0]``'s).

    Ablations (``kd=``): ``"wide"`` (the paper), ``"full"`` — the small switches distil from
    ``[1.0]`` and both the wide and ``[1.0]`` learn from labels, ``"none"`` — every switch learns
    from labels alone (no in-place KD); ``beta=0`` drops the activation term.
    """

    name = "paradis"
    KD_MODES = ("wide", "full", "none")

    def __init__(self, net, switches: Sequence, beta: float = 1.0, kd: str = "wide", temperature: float = 1.0,
                 teacher=None, full=None, **kw):
        super().__init__(net, **kw)
        import slimkern

        sws = [_as_switch(s) for s in switches]
        if len(sws) == 0:
            raise ValueError("ParaDiSTrainer: give at least one switch")
        if len(set(sws)) != len(sws):
            raise ValueError(f"ParaDiSTrainer: duplicate switches in {[str(s) for s in sws]}")
        if kd not in self.KD_MODES:
            raise ValueError(f"ParaDiSTrainer: kd must be one of {self.KD_MODES}, got {kd!r}")
        if beta < 0:
            raise ValueError(f"ParaDiSTrainer: beta must be >= 0, got {beta}")
        self.full = _as_switch(full) if full is not None else slimkern.Switch([1.0])
        if self.full not in sws:
            raise ValueError(f"ParaDiSTrainer: the full switch {self.full} must be among the switches "
                             f"{[str(s) for s in sws]} (it is the activation-distillation target)")
        self.teacher = _as_switch(teacher) if teacher is not None else max(sws, key=_width)
        if self.teacher not in sws:
            raise ValueError(f"ParaDiSTrainer: teacher {self.teacher} is not among the switches")
        if kd == "wide" and self.teacher == self.full:
            raise ValueError("ParaDiSTrainer: kd='wide' needs a wide teacher (e.g. [1.2]) besides [1.0]; "
                             "build the net with max_width > 1 or use kd='full'")
        # Teacher and full first: their logits/features are the targets of the others.
        rest = [s for s in sws if s not in (self.teacher, self.full)]
        self.switches = [self.teacher] + ([self.full] if self.full != self.teacher else []) + rest
        self.beta, self.kd, self.temperature = float(beta), kd, temperature
        self.needs_features = self.beta > 0

    def step_switches(self) -> list:
        return list(self.switches)

    def compute_losses(self, switches, logits, features, y):
        terms: dict[str, torch.Tensor] = {}
        has_wide = self.teacher != self.full
        z_w = logits[0]
        i_full = 1 if has_wide else 0
        z_f = logits[i_full]
        if has_wide:
            terms[f"ce {self.teacher}"] = self.ce(z_w, y)
        if self.kd == "wide":
            terms[f"kd {self.full}"] = kd_loss(z_f, z_w, self.temperature)
        else:
            terms[f"ce {self.full}"] = self.ce(z_f, y)
        for j in range(i_full + 1, len(switches)):
            s, z = switches[j], logits[j]
            if self.kd == "none":
                terms[f"ce {s}"] = self.ce(z, y)
            else:
                terms[f"kd {s}"] = kd_loss(z, z_w if self.kd == "wide" else z_f, self.temperature)
            if self.beta > 0:
                terms[f"mse {s}"] = self.beta * feature_mse(features[j], features[i_full])
        return terms

    def trained_switches(self) -> list:
        return list(self.switches)

    def teacher_term(self) -> str:
        # The widest switch always learns from the labels (it is [1.0] when there is no wide teacher).
        return f"ce {self.teacher}"


class IndividualTrainer(Trainer):
    """The baseline the papers compare with: one switch trained alone with cross-entropy
    (an "individual model" of that structure, e.g. ``[0.5, 0.5]`` as two independent
    half-width networks fused at the logits)."""

    name = "individual"

    def __init__(self, net, switch, **kw):
        super().__init__(net, **kw)
        self.switch = _as_switch(switch)

    def step_switches(self) -> list:
        return [self.switch]

    def compute_losses(self, switches, logits, features, y):
        return {f"ce {self.switch}": self.ce(logits[0], y)}

    def trained_switches(self) -> list:
        return [self.switch]

    def teacher_term(self) -> str:
        return f"ce {self.switch}"
