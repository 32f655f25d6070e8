"""Losses of in-place distillation (US-Nets, ParaDiS)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Soft-target cross-entropy of in-place distillation (Yu & Huang 2019, US-Nets):

    .. math:: \mathcal{L}_{KD} = -\frac{T^2}{B}\sum_b \sum_k \mathrm{softmax}(t_b/T)_k\,
              \log \mathrm{softmax}(s_b/T)_k

    The teacher is detached here, so the student never pulls the teacher toward itself.
    Equals KL(teacher || student) up to the teacher's entropy (a constant for the student).
    """
    t = teacher_logits.detach()
    if temperature != 1.0:
        return -(F.softmax(t / temperature, 1) * F.log_softmax(student_logits / temperature, 1)).sum(1).mean() \
            * temperature ** 2
    return -(F.softmax(t, 1) * F.log_softmax(student_logits, 1)).sum(1).mean()


def feature_mse(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    r"""ParaDiS activation distillation: :math:`\frac{1}{BC}\lVert f_s - \mathrm{sg}(f_{1.0})\rVert^2`,
    both features zero-padded to the same full width ``C`` (mean over batch and channels)."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"feature_mse: shapes differ {tuple(student_features.shape)} vs "
                         f"{tuple(teacher_features.shape)}; both must be padded to the full width")
    return F.mse_loss(student_features, teacher_features.detach())
