"""The training loop every recipe shares: packed multi-switch steps, SGD + schedule, seeds,
atomic per-epoch checkpoints and an exact resume.

A recipe (:class:`~slimkern.train.SandwichTrainer`, :class:`~slimkern.train.ParaDiSTrainer`,
:class:`~slimkern.train.IndividualTrainer`) says which switches run in a step and how their
outputs become losses; all switches of a step run in **one packed pass**
(``slimkern.forward_switches``) and one backward of the summed loss, whose gradient equals
the sum of the per-switch backward passes the papers write (gradients are linear). On nets where
packing does not pay (:func:`slimkern.train.packing.packing_pays`: dense 3x3 convolutions, as in
ResNet-20) every switch gets its own forward pass instead, still before the one backward.

Resume is exact: a checkpoint written after epoch ``e`` holds the weights, BN statistics,
optimizer and scheduler state, the trainer's own random generator (width sampling), the
data-order generator and the global Python/NumPy/torch RNG states, so continuing from it
gives bit-identical weights to a run that was never interrupted (on the same machine).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkern.train.collapse import CollapseGuard
from slimkern.train.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state, set_seed
from slimkern.train.optim import lr_factor, make_optimizer, make_scheduler
from slimkern.train.packing import check_pack, resolve_pack

log = logging.getLogger("slimkern.train")


def run_switches(net: nn.Module, x: torch.Tensor, switches: Sequence, return_features: bool = False,
                 pack: bool | str = "auto"):
    """Per-switch logits (and features zero-padded to the full width, else None).

    ``pack="auto"``: from one packed pass where packing pays
    (:func:`~slimkern.train.packing.packing_pays`), else from one pass per switch; ``True`` /
    ``False`` force either. The outputs are the same to float rounding; one switch at a time
    avoids the channel-window copies of dense convolutions. ``benchmarks/bench_trainer_step.py``
    (ParaDiS trainer step, batch 64, 32x32, two threads, AMD EPYC, interleaved median CPU time),
    one pass per switch against packed: ResNet-20 1.04x faster on AVX-512 and on AVX2 (1.09x and
    1.14x in two earlier runs on AVX-512); MobileNet-v1 0.90x on AVX-512, 0.95x on AVX2, so it
    stays packed.
    """
    import slimkern

    switches = list(switches)
    if resolve_pack(net, pack):
        out = slimkern.forward_switches(net, x, switches, return_features=return_features)
    else:
        outs = [slimkern.forward_switches(net, x, [sw], return_features=return_features) for sw in switches]
        out = ([o[0][0] for o in outs], [o[1][0] for o in outs]) if return_features else [o[0] for o in outs]
    if return_features:
        logits, feats = out
        return list(logits), list(feats)
    return list(out), None


class Trainer:
    """Base class. Subclasses define :meth:`step_switches` and :meth:`compute_losses`.

    Args:
        net: a slimmable network (``slimkern.slimmify`` or ``slimkern.models``).
        lr, momentum, weight_decay, nesterov: SGD (Nesterov momentum by default; no decay on
            1-D parameters — BN affine and biases).
        schedule: ``"cosine"`` (default), ``"linear"``, ``"step"`` (``milestones`` in epochs,
            ``gamma``) or ``"constant"``, applied per iteration; ``warmup_epochs`` linear warm-up.
        label_smoothing: for the cross-entropy terms.
        seed: seeds everything at construction (``deterministic`` also asks torch for
            deterministic kernels).
        checkpoint: path of the checkpoint written atomically after every epoch.
        progress: show a progress bar per epoch.
        device: where to train (default: the net's device, or the rank's device when distributed).
        distributed: a :class:`slimkern.train.distributed.DataParallel` to train data-parallel
            (sharded batches, synchronised BN, averaged gradients, rank-0 checkpoints).
        clip_grad_norm: clip the global gradient norm to this value before each step (None: off).
        fail_on_collapse: raise :class:`~slimkern.train.collapse.TrainingCollapsed` instead of
            warning when the teacher's loss sits at chance for an epoch (``teacher_term``).
        pack: how a step's switches are run (:func:`run_switches`): ``"auto"`` (default) packs
            them into one pass where packing pays, else one pass per switch; ``True`` / ``False``
            force either. Gradients are the same to float rounding.
    """

    needs_features = False
    name = "trainer"

    def __init__(self, net: nn.Module, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = True, schedule: str = "cosine", milestones: Sequence[float] = (),
                 gamma: float = 0.1, warmup_epochs: float = 0.0, label_smoothing: float = 0.0, seed: int = 0,
                 deterministic: bool = True, checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 device: str | torch.device | None = None, distributed=None,
                 clip_grad_norm: float | None = None, fail_on_collapse: bool = False, pack: bool | str = "auto"):
        if not isinstance(net, nn.Module):
            raise TypeError(f"{type(self).__name__}: net must be an nn.Module, got {type(net).__name__}")
        check_pack(pack)
        self.pack = pack
        set_seed(seed, deterministic)
        self.net = net
        self.distributed = distributed
        if device is None and distributed is not None:
            device = distributed.device
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net.to(self.device)
        self.optimizer = make_optimizer(net, lr, momentum, weight_decay, nesterov)
        self.schedule, self.milestones, self.gamma, self.warmup_epochs = schedule, tuple(milestones), gamma, warmup_epochs
        self.scheduler = None
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)          # width sampling
        self.data_generator = torch.Generator().manual_seed(seed + 1)  # data order
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.progress = progress
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        lr_factor(schedule, 0, 1, 1, self.milestones, gamma, warmup_epochs)  # validates the schedule now
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"{type(self).__name__}: clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        self.collapse_guard = CollapseGuard(fail=fail_on_collapse)
        self._num_classes: int | None = None

    # ----- what a recipe defines -------------------------------------------------------
    def step_switches(self) -> list:
        raise NotImplementedError

    def compute_losses(self, switches: list, logits: list[torch.Tensor], features: list[torch.Tensor] | None,
                       y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms; the step minimises their sum."""
        raise NotImplementedError

    def trained_switches(self) -> list:
        """The switches this recipe trains (evaluation marks them ``trained=True``)."""
        raise NotImplementedError

    def teacher_term(self) -> str | None:
        """The loss term holding the teacher's cross-entropy (the collapse guard watches it); None: no guard."""
        return None

    # ----- one step ----------------------------------------------------------------------
    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward all of this step's switches (:func:`run_switches`); returns (total, terms)."""
        switches = self.step_switches()
        logits, feats = run_switches(self.net, x, switches, self.needs_features, pack=self.pack)
        terms = self.compute_losses(switches, logits, feats, y)
        self._num_classes = int(logits[0].shape[-1])
        total = torch.stack(list(terms.values())).sum()
        return total, terms

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        self.net.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.distributed.forward_context(self.net) if self.distributed is not None else contextlib.nullcontext():
            total, terms = self.loss(x, y)
        if not torch.isfinite(total):
            raise FloatingPointError(f"{self.name}: non-finite loss {total.item()} at step {self.global_step} "
                                     f"(terms: { {k: float(v.detach()) for k, v in terms.items()} }); lower the lr")
        total.backward()
        out = {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        if self.distributed is not None:  # one all-reduce: gradients (and logged terms) averaged over ranks
            out = self.distributed.average_gradients(self.net, out)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.grad is not None], self.clip_grad_norm)
        if self.teacher_term() in out:
            self.collapse_guard.observe(out[self.teacher_term()], self._num_classes)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        return out

    # ----- the loop ----------------------------------------------------------------------
    def make_loader(self, data, batch_size: int) -> DataLoader:
        if self.distributed is not None:
            return self.distributed.loader(data, batch_size, self.data_generator)
        if isinstance(data, DataLoader):
            return data
        if not isinstance(data, Dataset):
            raise TypeError(f"fit: data must be a Dataset or DataLoader, got {type(data).__name__}")
        # drop_last: a batch of 1 would break BN's batch statistics.
        return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) > batch_size,
                          generator=self.data_generator)

    def fit(self, data, epochs: int, batch_size: int = 64, resume: bool = False,
            on_epoch_end: Callable[["Trainer", dict], None] | None = None) -> list[dict]:
        """Train for ``epochs`` epochs in total (a resumed run continues to the same total).

        ``on_epoch_end(trainer, record)`` runs after each epoch's checkpoint is written.
        Returns the per-epoch history (mean of each loss term, seconds, lr).
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
        loader = self.make_loader(data, batch_size)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise ValueError("fit: the data loader is empty")
        self.scheduler = make_scheduler(self.optimizer, self.schedule, epochs * steps_per_epoch, steps_per_epoch,
                                        self.milestones, self.gamma, self.warmup_epochs)
        if resume:
            if self.checkpoint is None:
                raise ValueError("fit(resume=True) needs the trainer's checkpoint path")
            if os.path.isfile(self.checkpoint):
                self.load(self.checkpoint)
                log.info("resumed from %s at epoch %d", self.checkpoint, self.epoch)
            else:
                log.info("no checkpoint at %s: starting from scratch", self.checkpoint)
        if self.distributed is not None:  # every rank continues from rank 0's state
            self.distributed.sync_trainer(self)
        while self.epoch < epochs:
            record = self._run_epoch(loader, epochs)
            # A warm-up epoch starts from lr ~ 0: sitting near chance there is expected, not a collapse.
            collapsed = self.collapse_guard.end_epoch(self.epoch + 1, self.teacher_term(),
                                                      judge=self.epoch + 1 > self.warmup_epochs)
            if collapsed:
                log.warning(collapsed)
                warnings.warn(collapsed, RuntimeWarning, stacklevel=2)
                record["collapsed"] = 1.0
            self.epoch += 1
            self.history.append(record)
            if self.checkpoint is not None:
                self.save(self.checkpoint)
            log.info("epoch %d/%d %s", self.epoch, epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            if on_epoch_end is not None:
                on_epoch_end(self, record)
        return self.history

    def _run_epoch(self, loader: DataLoader, epochs: int) -> dict:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"{self.name} epoch {self.epoch + 1}/{epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        for x, y in bar:
            terms = self.train_step(x, y)
            n += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
        bar.close()
        record = {"epoch": self.epoch + 1, **{k: v / max(1, n) for k, v in sums.items()},
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        return record

    # ----- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "trainer": self.name, "epoch": self.epoch, "global_step": self.global_step,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generator": self.generator.get_state(), "data_generator": self.data_generator.get_state(),
            "rng": rng_state(), "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("trainer") != self.name:
            raise ValueError(f"checkpoint was written by {state.get('trainer')!r}, not {self.name!r}")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.data_generator.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])

    def save(self, path: str | os.PathLike) -> None:
        if self.distributed is not None and not self.distributed.prepare_checkpoint(self.net):
            return  # collective consistency check on every rank; rank 0 alone writes
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path))
