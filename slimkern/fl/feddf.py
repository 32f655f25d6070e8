"""FedDF: ensemble distillation on the server after aggregation (Lin, Kong, Stich & Jaggi,
"Ensemble Distillation for Robust Model Fusion in Federated Learning", NeurIPS 2020; code:
epfml/federated-learning-public-code, ``codes/FedDF-code``, ``NoiseKTSolver``).

After a round's aggregation the server holds the round's client models (the *teachers*)
and the aggregated model (the *student*). On unlabeled server data ``x`` (never the clients'
data: a held-out unlabeled split, another distribution, augmented or noise images) the
student is trained to match the teachers' ensemble:

    t(x) = sum_k a_k f_k(x) / sum_k a_k        (averaged logits; a_k = 1, or the sample count)
    L(x) = T^2 KL( softmax(t(x) / T) || softmax(s(x) / T) )

with Adam (lr 1e-3), a cosine schedule over the server steps, gradient-norm clipping
(5), ``T = 1``; teachers in eval mode, the student's BN in train mode (the anchor's
choices, all configurable). Every ``eval_every`` steps the student is scored on a server
validation split (accuracy if it has labels, else the negative KL to the ensemble); the
best snapshot (the undistilled student included) is kept and training stops after
``patience`` steps without improvement. ``drop_worst`` leaves out the teachers that score
worst on the validation split.

Students: a slimmable / ParaDiS shared net distils *every evaluated switch in one packed
pass* (``slimkern.forward_switches``; the summed loss over switches); the
distinct-architecture baseline distils each architecture's model from the same ensemble.
The server compute is counted: teacher forward MACs plus student forward + backward
(taken as 3x forward) MACs, from ``slimkern.profile``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Teacher", "DistillReport", "FedDF", "ensemble_logits"]


@dataclass
class Teacher:
    """A received client model: ``model`` run under ``switch`` (a slim net's client switch; None:
    as it is), ``weight`` its share of the ensemble (e.g. its sample count)."""
    model: nn.Module
    switch: Any = None
    weight: float = 1.0


@dataclass
class DistillReport:
    steps: int = 0                      # server steps run
    best_step: int = 0                  # step of the kept snapshot (0: the undistilled student)
    initial_score: float = math.nan     # validation score before distillation
    best_score: float = math.nan
    scores: list = field(default_factory=list)  # (step, score) at every evaluation
    teachers: int = 0                   # teachers in the ensemble (after drop-worst)
    dropped: list = field(default_factory=list)  # indices of dropped teachers
    server_macs: int = 0                # multiply-adds spent on the server (None parts: unknown)
    time_s: float = 0.0
    metric: str = "accuracy"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _run(model: nn.Module, sw, x: torch.Tensor) -> torch.Tensor:
    if sw is None:
        return model(x)
    from slimkern.nn import use_switch
    with use_switch(model, sw):
        return model(x)


def _student_logits(student: nn.Module, switches, x: torch.Tensor) -> list[torch.Tensor]:
    if switches is None:
        return [student(x)]
    from slimkern.nn import forward_switches
    return forward_switches(student, x, list(switches))


def ensemble_logits(teachers: Sequence[Teacher], x: torch.Tensor, batch_size: int = 256,
                    weighted: bool = False) -> torch.Tensor:
    """Averaged logits ``sum_k a_k f_k(x) / sum_k a_k`` of eval-mode teachers on ``x``."""
    ws = [float(t.weight) if weighted else 1.0 for t in teachers]
    total = None
    for t, w in zip(teachers, ws):
        out = torch.cat([_eval_logits(t.model, t.switch, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        total = out * w if total is None else total + out * w
    return total / sum(ws)


def _in_eval(model, fn):
    """``fn()`` with ``model`` in eval mode and no gradients; its train/eval flag restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.train(was)


def _eval_logits(model, sw, x):
    return _in_eval(model, lambda: _run(model, sw, x))


def _macs(model, sw, input_size) -> int | None:
    try:
        from slimkern.profile import profile
        return int(profile(model, sw, input_size=input_size).macs)
    except Exception:  # noqa: BLE001 - a model profile cannot read is counted as unknown
        return None


class FedDF:
    """Server-side ensemble distillation (module docstring), usable as ``simulate``'s
    ``server_step`` and directly through :meth:`distill`.

    Args:
        unlabeled: ``[N, ...]`` server inputs without labels (a tensor, or ``(X, Y)`` whose
            labels are ignored).
        val: the early-stopping split: ``(X, Y)`` (scored by mean top-1 of the student's
            switches), a tensor ``X`` (scored by ``-KL`` to the ensemble), or None: the last
            ``val_fraction`` of ``unlabeled`` (scored by ``-KL``).
        steps: server steps at most (batches of ``batch_size``); lr, betas: Adam;
            schedule: ``"cosine"`` over ``steps`` or ``"constant"``; clip_norm: gradient
            norm clipping (None: off); temperature: ``T``.
        eval_every / patience: early stopping (steps); the best snapshot is returned.
        weighted: teacher logits weighted by ``Teacher.weight``; drop_worst: number of
            worst-scoring teachers (on ``val``) left out.
        student_bn: ``"train"`` (the anchor: batch statistics while distilling) or
            ``"eval"``.
        augment: ``(x, generator) -> x``; with it the distillation pool of a round is
            ``augment_copies`` augmented copies of the unlabeled data (drawn per round; the
            teachers run on the pool once).
        calibrate: BN statistics never travel, so the server recomputes them on the unlabeled
            data (``slimkern.calibrate_bn``, slim nets only) before distilling: ``"teachers"``
            (default: each teacher at its switch), ``"both"`` (the student's switches too, so
            the undistilled student is scored fairly), ``"none"``.
        switches: the student's switches when used as ``server_step`` (default: the distinct
            switches the round's clients trained).
        seed: batch order and augmentation.
    """

    def __init__(self, unlabeled, val=None, *, steps: int = 500, batch_size: int = 64, lr: float = 1e-3,
                 betas=(0.9, 0.999), schedule: str = "cosine", clip_norm: float | None = 5.0,
                 temperature: float = 1.0, eval_every: int = 50, patience: int = 200, weighted: bool = False,
                 drop_worst: int = 0, student_bn: str = "train", val_fraction: float = 0.2,
                 augment: Callable | None = None, augment_copies: int = 4, calibrate: str = "teachers",
                 switches: Sequence | None = None, seed: int = 0):
        if isinstance(unlabeled, (tuple, list)) and len(unlabeled) == 2:
            unlabeled = unlabeled[0]
        if not isinstance(unlabeled, torch.Tensor) or unlabeled.dim() < 2 or len(unlabeled) < 2:
            raise ValueError("FedDF: unlabeled must be a tensor of at least 2 inputs [N, ...] (or (X, Y))")
        if not bool(torch.isfinite(unlabeled).all()):
            raise ValueError("FedDF: unlabeled data contains NaN or inf")
        for name, v, lo in (("steps", steps, 0), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1),
                            ("patience", patience, 1), ("drop_worst", drop_worst, 0),
                            ("augment_copies", augment_copies, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"FedDF: {name} must be an int >= {lo}, got {v!r}")
        for name, v in (("lr", lr), ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"FedDF: {name} must be a positive number, got {v!r}")
        if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
            raise ValueError(f"FedDF: clip_norm must be positive or None, got {clip_norm!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"FedDF: schedule must be 'cosine' or 'constant', got {schedule!r}")
        if student_bn not in ("train", "eval"):
            raise ValueError(f"FedDF: student_bn must be 'train' or 'eval', got {student_bn!r}")
        if calibrate not in ("teachers", "both", "none"):
            raise ValueError(f"FedDF: calibrate must be 'teachers', 'both' or 'none', got {calibrate!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"FedDF: val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_labels = None
        if val is None:
            n_val = max(1, int(round(val_fraction * len(unlabeled))))
            if len(unlabeled) - n_val < 1:
                raise ValueError("FedDF: unlabeled data too small to hold out a validation split")
            unlabeled, val = unlabeled[:-n_val], unlabeled[-n_val:]
        elif isinstance(val, (tuple, list)) and len(val) == 2:
            val, self.val_labels = val
            self.val_labels = torch.as_tensor(self.val_labels).long()
            if len(self.val_labels) != len(val):
                raise ValueError(f"FedDF: val has {len(val)} inputs but {len(self.val_labels)} labels")
        if not isinstance(val, torch.Tensor) or len(val) == 0 or tuple(val.shape[1:]) != tuple(unlabeled.shape[1:]):
            raise ValueError(f"FedDF: val inputs must be a non-empty tensor shaped like the unlabeled data "
                             f"[N, {', '.join(map(str, unlabeled.shape[1:]))}]")
        self.unlabeled, self.val = unlabeled, val
        self.steps, self.batch_size, self.lr, self.betas = steps, batch_size, float(lr), tuple(betas)
        self.schedule, self.clip_norm, self.temperature = schedule, clip_norm, float(temperature)
        self.eval_every, self.patience, self.weighted, self.drop_worst = eval_every, patience, weighted, drop_worst
        self.student_bn, self.augment, self.augment_copies, self.seed = student_bn, augment, augment_copies, seed
        self.calibrate, self.switches = calibrate, None if switches is None else list(switches)
        self.reports: list[DistillReport] = []

    def __repr__(self):
        return (f"FedDF(n_unlabeled={len(self.unlabeled)}, n_val={len(self.val)}, steps={self.steps}, "
                f"batch_size={self.batch_size}, lr={self.lr}, schedule={self.schedule!r}, clip_norm={self.clip_norm}, "
                f"temperature={self.temperature}, eval_every={self.eval_every}, patience={self.patience}, "
                f"weighted={self.weighted}, drop_worst={self.drop_worst}, student_bn={self.student_bn!r}, "
                f"calibrate={self.calibrate!r}, seed={self.seed})")

    # -- checks ---------------------------------------------------------------------------
    def _check(self, student, teachers, switches):
        if not isinstance(student, nn.Module):
            raise TypeError(f"FedDF: the student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(teachers, (list, tuple)) or not teachers:
            raise ValueError("FedDF: no teachers: the round returned no client model to distil from")
        for i, t in enumerate(teachers):
            if not isinstance(t, Teacher):
                raise TypeError(f"FedDF: teachers[{i}] is a {type(t).__name__}, not a slimkern.fl.feddf.Teacher")
            if not (isinstance(t.weight, (int, float)) and math.isfinite(t.weight) and t.weight >= 0):
                raise ValueError(f"FedDF: teachers[{i}] weight must be finite and >= 0, got {t.weight!r}")
        if self.weighted and sum(float(t.weight) for t in teachers) <= 0:
            raise ValueError("FedDF: weighted teachers need a positive total weight")
        if switches is not None and (isinstance(switches, (str,)) or not list(switches)):
            raise ValueError("FedDF: switches must be a non-empty list (or None for a plain student)")
        probe = self.unlabeled[:2]
        try:
            ref = _student_logits_eval(student, switches, probe)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"FedDF: unlabeled data of shape {tuple(self.unlabeled.shape)} does not fit the "
                             f"student: {type(exc).__name__}: {exc}") from None
        for i, t in enumerate(teachers):
            try:
                out = _eval_logits(t.model, t.switch, probe)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"FedDF: unlabeled data of shape {tuple(self.unlabeled.shape)} does not fit "
                                 f"teacher {i}: {type(exc).__name__}: {exc}") from None
            if out.shape != ref[0].shape:
                raise ValueError(f"FedDF: teacher {i} gives logits {tuple(out.shape[1:])}, the student "
                                 f"{tuple(ref[0].shape[1:])}")

    # -- the server_step of simulate ------------------------------------------------------
    def __call__(self, model: nn.Module, replies: Sequence, round_index: int) -> dict:
        """``simulate(..., server_step=FedDF(...))``: teachers = the round's replies (each
        client's trained slice in a copy of ``model``, ``slimkern.fl.reply_model``, run at its
        switch, weighted by its samples when ``weighted``); student = ``model`` at
        ``self.switches`` or the switches the clients trained, all in one packed pass."""
        from slimkern.fl.rolex import train_switch
        from slimkern.fl.server import reply_model
        if not replies:  # nobody returned: nothing to distil, the round's note says so
            return {"feddf_teachers": 0.0}
        teachers = [Teacher(reply_model(model, r), train_switch(r.switch), float(r.num_samples)) for r in replies]
        sws = self.switches or sorted({train_switch(r.switch) for r in replies}, key=str)
        rep = self.distill(model, teachers, sws, round_index)
        return {"feddf_teachers": float(rep.teachers), "feddf_steps": float(rep.steps),
                "feddf_best_step": float(rep.best_step), "feddf_val_before": rep.initial_score,
                "feddf_val_after": rep.best_score,
                "feddf_server_macs": float("nan") if rep.server_macs is None else float(rep.server_macs)}

    # -- scoring --------------------------------------------------------------------------
    def _score(self, student, switches, target_val) -> float:
        outs = [torch.cat(o) for o in zip(*[_student_logits_eval(student, switches, self.val[i:i + 256])
                                            for i in range(0, len(self.val), 256)])]
        if self.val_labels is not None:
            return float(sum((o.argmax(1) == self.val_labels).float().mean() for o in outs) / len(outs))
        return -float(sum(_kl(o, target_val, self.temperature) for o in outs) / len(outs))

    # -- the distillation -----------------------------------------------------------------
    def distill(self, student: nn.Module, teachers: Sequence[Teacher], switches: Sequence | None = None,
                round_index: int = 0) -> DistillReport:
        """Distils ``teachers``' ensemble into ``student`` in place (the best snapshot is
        loaded at the end); ``switches``: the student's switches trained together in one
        packed pass (None: a plain forward). Returns a ``DistillReport``."""
        return self.distill_many([(student, switches)], teachers, round_index)[0]

    def distill_many(self, students: Sequence, teachers: Sequence[Teacher], round_index: int = 0) -> list:
        """FedDF's heterogeneous setting: every ``(student, switches)`` (each architecture's
        model) distilled from one ensemble, whose teachers are calibrated, dropped and run
        once (their cost is counted in the first report). Returns one report per student."""
        if not isinstance(students, (list, tuple)) or not students:
            raise ValueError("FedDF: students must be a non-empty list of (model, switches) pairs")
        for st in students:
            if not (isinstance(st, (list, tuple)) and len(st) == 2):
                raise ValueError("FedDF: students must be (model, switches) pairs; switches None for a plain model")
            self._check(st[0], teachers, st[1])
        t0 = time.perf_counter()
        counter = _Counter()
        teachers, dropped, target_all, target_val, pool = self._prepare(list(teachers), counter, round_index)
        reports = []
        for i, (student, switches) in enumerate(students):
            rep = DistillReport(metric="accuracy" if self.val_labels is not None else "-kl", teachers=len(teachers),
                                dropped=list(dropped))
            self._train(student, switches, target_all, target_val, pool, counter, rep, round_index)
            rep.server_macs = counter.take()
            rep.time_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.reports.append(rep)
            reports.append(rep)
        return reports

    def _prepare(self, teachers, counter, round_index):
        """Teachers calibrated and (drop-worst) scored; the ensemble's logits on the validation
        split and on the distillation pool (the unlabeled data, or ``augment_copies``
        augmented copies of it drawn for this round)."""
        in_size = (1, *self.unlabeled.shape[1:])
        t_macs = [_macs(t.model, t.switch, in_size) for t in teachers]
        if self.calibrate != "none":
            n_cal = min(len(self.unlabeled), 8 * 64)
            for t, m in zip(teachers, t_macs):
                if _calibrate(t.model, [t.switch], self.unlabeled[:n_cal]):
                    counter.spend(n_cal, m)
        dropped: list = []
        if self.drop_worst:
            if self.drop_worst >= len(teachers):
                raise ValueError(f"FedDF: drop_worst={self.drop_worst} would drop all {len(teachers)} teachers")
            ens_val = ensemble_logits(teachers, self.val, weighted=self.weighted)
            scores = []
            for i, t in enumerate(teachers):
                out = torch.cat([_eval_logits(t.model, t.switch, self.val[j:j + 256])
                                 for j in range(0, len(self.val), 256)])
                counter.spend(len(self.val), t_macs[i])
                scores.append(float((out.argmax(1) == self.val_labels).float().mean()) if self.val_labels is not None
                              else -float(_kl(out, ens_val, self.temperature)))
            order = sorted(range(len(teachers)), key=lambda i: scores[i])
            dropped = sorted(order[:self.drop_worst])
            teachers = [t for i, t in enumerate(teachers) if i not in dropped]
            t_macs = [m for i, m in enumerate(t_macs) if i not in dropped]
        target_val = ensemble_logits(teachers, self.val, weighted=self.weighted)
        pool = self.unlabeled
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(round_index) + 17)
            pool = torch.cat([self.augment(self.unlabeled, gen) for _ in range(self.augment_copies)])
        target_all = ensemble_logits(teachers, pool, weighted=self.weighted)
        for m in t_macs:
            counter.spend(len(self.val) + len(pool), m)
        return teachers, dropped, target_all, target_val, pool

    def _train(self, student, switches, target_all, target_val, pool, counter, rep, round_index):
        in_size = (1, *self.unlabeled.shape[1:])
        s_macs = [_macs(student, s, in_size) for s in (switches or [None])]
        if self.calibrate == "both" and _calibrate(student, list(switches or [None]), pool[:8 * 64]):
            for m in s_macs:
                counter.spend(min(len(pool), 8 * 64), m)
        best = self._score(student, switches, target_val)
        for m in s_macs:
            counter.spend(len(self.val), m)
        rep.initial_score = rep.best_score = best
        rep.scores.append((0, best))
        if self.steps == 0:
            return
        best_state = copy.deepcopy(student.state_dict())
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps) if self.schedule == "cosine" else None)
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(round_index))
        n = len(pool)
        was = student.training
        perm, cursor, since = torch.randperm(n, generator=gen), 0, 0
        try:
            for step in range(1, self.steps + 1):
                if cursor + self.batch_size > n:
                    perm, cursor = torch.randperm(n, generator=gen), 0
                bi = perm[cursor:cursor + self.batch_size]
                cursor += self.batch_size
                student.train(self.student_bn == "train")
                outs = _student_logits(student, switches, pool[bi])
                loss = sum(_kl(o, target_all[bi], self.temperature) for o in outs)
                for m in s_macs:
                    counter.spend(3 * len(bi), m)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
                opt.step()
                if sched is not None:
                    sched.step()
                rep.steps = step
                if step % self.eval_every == 0 or step == self.steps:
                    score = self._score(student, switches, target_val)
                    for m in s_macs:
                        counter.spend(len(self.val), m)
                    rep.scores.append((step, score))
                    if score > best:
                        best, rep.best_step, since = score, step, 0
                        best_state = copy.deepcopy(student.state_dict())
                    else:
                        since += step - rep.scores[-2][0]
                        if since >= self.patience:
                            break
        finally:
            student.train(was)
        student.load_state_dict(best_state)
        rep.best_score = best


class _Counter:
    """Server multiply-adds; None once any part is unknown (a model profile cannot read)."""

    def __init__(self):
        self.total, self.known = 0, True

    def spend(self, n_samples, per_sample) -> None:
        if per_sample is None:
            self.known = False
        else:
            self.total += int(n_samples) * int(per_sample)

    def take(self):
        out = self.total if self.known else None
        self.total, self.known = 0, True
        return out


def _calibrate(model, switches, x) -> bool:
    """Switchable-BN statistics of ``switches`` (None: the model's current one) on ``x``;
    False when the model has no switchable BN (plain models keep their own statistics)."""
    from slimkern.nn import calibrate_bn, current_switches
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    if not any(isinstance(m, _SwitchableBatchNorm) for m in model.modules()):
        return False
    sws = []
    for s in switches:
        sws.extend(current_switches(model) if s is None else [s])
    calibrate_bn(model, [(x[i:i + 64],) for i in range(0, len(x), 64)], sorted(set(sws), key=str))
    return True


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def _student_logits_eval(student, switches, x):
    return _in_eval(student, lambda: _student_logits(student, switches, x))
