r"""The collapse guard: notice when a run's teacher stops learning and sits at chance.

A network whose ReLUs have all died (one oversized early step can push every BN shift of a
layer far negative; nothing flows back through a ReLU that is zero for every input) predicts
the same distribution for every image. Its cross-entropy then sits at the entropy of the
label prior, :math:`\ln K` for :math:`K` balanced classes (2.303 on digits), and no later step
can recover it: every in-place-distilled switch learns from that constant teacher and lands at
chance too. Found on ``slimkern demo paradis --seed 2`` (see docs/paradis.md).

The guard looks at the teacher's cross-entropy (the loss term a recipe names in
``Trainer.teacher_term``) step by step. An epoch *collapsed* when the mean over its second half
is no better than chance:

.. math:: \frac{1}{|H|}\sum_{t \in H} \mathrm{CE}_t \ \ge\ (1 - \tau)\,\ln K

with :math:`H` the last half of the epoch's steps (the first half of epoch 1 starts from a
random init, which is at or above chance in a healthy run too) and :math:`\tau` = ``rel_tol``
(default 0.03: 2.23 nats on 10 classes; a learning network is far below that by the middle of
its first epoch at full lr). Warm-up epochs are not judged: from lr ~ 0, the demo's first
epoch averages 2.27-2.32 nats and then learns normally. The trainer warns, or raises :class:`TrainingCollapsed` with
``fail_on_collapse=True``.
"""
from __future__ import annotations

import math

__all__ = ["CollapseGuard", "TrainingCollapsed"]


class TrainingCollapsed(RuntimeError):
    """Raised by a trainer with ``fail_on_collapse=True`` when its teacher is at chance for an epoch."""


class CollapseGuard:
    """Collects the teacher's per-step cross-entropy of one epoch and judges it at the epoch's end.

    Args:
        rel_tol: the epoch collapsed when its second-half mean CE is >= ``(1 - rel_tol) * ln K``.
        fail: raise :class:`TrainingCollapsed` instead of returning the message.
    """

    def __init__(self, rel_tol: float = 0.03, fail: bool = False):
        if not 0.0 <= rel_tol < 1.0:
            raise ValueError(f"CollapseGuard: rel_tol must be in [0, 1), got {rel_tol!r}")
        self.rel_tol, self.fail = float(rel_tol), bool(fail)
        self.losses: list[float] = []
        self.num_classes: int | None = None

    def observe(self, teacher_ce: float, num_classes: int) -> None:
        """Record one step's teacher cross-entropy (``num_classes``: the logits' width, K)."""
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"CollapseGuard.observe: num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.losses.append(float(teacher_ce))

    def chance(self) -> float:
        """:math:`\\ln K`, the cross-entropy of a prediction that ignores the input (balanced classes)."""
        if self.num_classes is None:
            raise RuntimeError("CollapseGuard.chance: no step observed yet")
        return math.log(self.num_classes)

    def end_epoch(self, epoch: int, teacher: str | None, judge: bool = True) -> str | None:
        """Judge the epoch just finished and start a new one. Returns a message when it
        collapsed (raises :class:`TrainingCollapsed` with it when ``fail``), else None.
        ``judge=False`` only starts the new epoch (the trainer passes it for warm-up epochs)."""
        losses, self.losses = self.losses, []
        if not losses or not judge:
            return None
        half = losses[len(losses) // 2:]
        mean = sum(half) / len(half)
        chance = self.chance()
        if mean < (1.0 - self.rel_tol) * chance:
            return None
        msg = (f"training collapsed: the teacher's cross-entropy ({teacher!r}) averages {mean:.3f} over the second "
               f"half of epoch {epoch}; chance level is ln {self.num_classes} = {chance:.3f}. Its predictions no longer "
               f"depend on the input (typically every ReLU of a layer died after an oversized early step), so "
               f"every switch distilled from it stays at chance too. Lower --lr, or keep the default warm-up "
               f"(--warmup-epochs) and gradient clipping (--clip-grad-norm), or try another --seed.")
        if self.fail:
            raise TrainingCollapsed(msg)
        return msg
