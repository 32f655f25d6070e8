r"""The training recipes of ``slimkern.train`` for super-resolution: L1 on pixels instead of
cross-entropy, L1 to a detached teacher output instead of soft-target KD, Adam (the WDSR recipe).

With per-switch outputs :math:`z_s` (images), the ground truth :math:`y` and the teacher
:math:`t` (the widest switch):

* ParaDiS (Ozerov et al., Algorithm 1, Appendix D for WDSR):
  :math:`\mathcal{L} = |z_t - y|_1 + \sum_{s \ne t} |z_s - \mathrm{sg}(z_t)|_1
  + \beta \sum_{s \notin \{t, f\}} \mathrm{MSE}(h_s, \mathrm{sg}(h_f))`, with ``f = [1.0]``
  and :math:`h` the features entering the fused tail (zero-padded to the full width);
  ``kd=False`` trains every switch on :math:`y` instead.
* US-Nets sandwich rule with in-place distillation (Yu & Huang 2019):
  :math:`|z_{max} - y|_1 + \sum_{w \ne max} |z_w - \mathrm{sg}(z_{max})|_1`.
* Individual model: :math:`|z - y|_1`.

(:math:`|\cdot|_1` is the mean absolute error over pixels.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkern.train.losses import feature_mse
from slimkern.train.recipes import IndividualTrainer, SandwichTrainer, _width
from slimkern.train.trainer import Trainer


def _adam(trainer: Trainer, lr: float) -> None:
    # WDSR trains with Adam; the base Trainer built SGD, which fit() never touched yet.
    trainer.optimizer = torch.optim.Adam(trainer.net.parameters(), lr=lr)


class SRParaDiSTrainer(Trainer):
    """ParaDiS on a super-resolution net (see the module docstring). The teacher ``t`` is the
    widest switch (the full switch on a tie)."""

    name = "sr-paradis"

    def __init__(self, net, switches, beta: float = 0.0, kd: bool = True, full="[1.0]x", lr: float = 1e-3, **kw):
        from slimkern.nn.switching import as_switch

        super().__init__(net, lr=lr, **kw)
        sws = [as_switch(s) for s in switches]
        if not sws or len(set(sws)) != len(sws):
            raise ValueError(f"SRParaDiSTrainer: need distinct switches, got {[str(s) for s in sws]}")
        if beta < 0:
            raise ValueError(f"SRParaDiSTrainer: beta must be >= 0, got {beta}")
        self.full = as_switch(full)
        # the widest switch; on a tie (e.g. [1.0] and [0.5, 0.5]) the full switch, then fewest branches
        self.teacher = max(sws, key=lambda s: (_width(s), s == self.full, -s.num_branches))
        if beta > 0 and self.full not in sws:
            raise ValueError(f"SRParaDiSTrainer: beta > 0 needs the full switch {self.full} among the switches")
        first = [self.teacher] + ([self.full] if self.full in sws and self.full != self.teacher else [])
        self.switches = first + [s for s in sws if s not in first]
        self.beta, self.kd = float(beta), bool(kd)
        self.needs_features = self.beta > 0
        _adam(self, lr)

    def step_switches(self) -> list:
        return list(self.switches)

    def compute_losses(self, switches, outs, features, y):
        z_t = outs[0]
        terms = {f"l1 {switches[0]}": F.l1_loss(z_t, y)}
        i_full = switches.index(self.full) if self.full in switches else None
        for j in range(1, len(switches)):
            s = switches[j]
            terms[f"{'kd' if self.kd else 'l1'} {s}"] = F.l1_loss(outs[j], z_t.detach() if self.kd else y)
            if self.beta > 0 and j != i_full:
                terms[f"mse {s}"] = self.beta * feature_mse(features[j], features[i_full])
        return terms

    def trained_switches(self) -> list:
        return list(self.switches)


class SRSandwichTrainer(SandwichTrainer):
    """US-Nets sandwich rule with in-place distillation, L1 losses, Adam."""

    name = "sr-sandwich"

    def __init__(self, net, lr: float = 1e-3, **kw):
        super().__init__(net, lr=lr, **kw)
        _adam(self, lr)

    def compute_losses(self, switches, outs, features, y):
        terms = {"l1_max": F.l1_loss(outs[0], y)}
        for i, z in enumerate(outs[1:], start=1):
            key = "min" if i == 1 else f"rand{i - 1}"
            terms[f"kd_{key}" if self.inplace_kd else f"l1_{key}"] = F.l1_loss(
                z, outs[0].detach() if self.inplace_kd else y)
        return terms


class SRIndividualTrainer(IndividualTrainer):
    """One switch trained alone on the ground truth (an individual model), L1, Adam."""

    name = "sr-individual"

    def __init__(self, net, switch, lr: float = 1e-3, **kw):
        super().__init__(net, switch, lr=lr, **kw)
        _adam(self, lr)

    def compute_losses(self, switches, outs, features, y):
        return {f"l1 {self.switch}": F.l1_loss(outs[0], y)}
