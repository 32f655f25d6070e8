"""Training recipes for slimmable and ParaDiS networks.

- :class:`SandwichTrainer`: US-Nets sandwich rule + in-place distillation.
- :class:`ParaDiSTrainer`: ParaDiS Algorithm 1 (wide teacher, KD, activation MSE) and its ablations.
- :class:`IndividualTrainer`: one switch alone, the papers' baseline.

All share :class:`Trainer`: SGD (Nesterov, weight decay), cosine/linear/step schedules,
seeds, atomic per-epoch checkpoints and exact resume.
"""
from slimkern.train.checkpoint import atomic_save, load_checkpoint, set_seed
from slimkern.train.losses import feature_mse, kd_loss
from slimkern.train.optim import lr_factor, make_optimizer, make_scheduler
from slimkern.train.recipes import IndividualTrainer, ParaDiSTrainer, SandwichTrainer
from slimkern.train.trainer import Trainer, run_switches

__all__ = ["IndividualTrainer", "ParaDiSTrainer", "SandwichTrainer", "Trainer", "atomic_save", "feature_mse",
           "kd_loss", "load_checkpoint", "lr_factor", "make_optimizer", "make_scheduler", "run_switches", "set_seed"]
from slimkern.train.packed_step import packed_loss, packed_step  # noqa: E402,F401
from slimkern.train.memory import keep_freed_memory  # noqa: E402,F401
from slimkern.train.packing import packing_pays, window_copy_share  # noqa: E402,F401
