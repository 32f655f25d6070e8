"""FedRolex: rolling dense sub-models gathered from per-layer index sets."""
from __future__ import annotations

from slimkern.fl.aggregate import average
from slimkern.fl.heterofl_local import HeteroFLRecipe
from slimkern.fl.rolex import SubModel
from slimkern.fl.rules.base import Rule, check_weighting, per_device_width, switch_cls

__all__ = ["FedRolex"]


class FedRolex(HeteroFLRecipe, Rule):
    """Rolling dense sub-models (Alam et al. 2022) as the reference code trains them
    (``slimkern.fl.rolex``): in round ``r`` a client of width ``p`` trains, per layer of
    ``C`` channels, the dense sub-matrix on ``idx = roll(arange(C), r mod C)[:round(p C)]``
    (``step=None``: one channel per round), gathered into the prefix of a re-indexed copy and
    scattered back; ``step`` (a fraction of each layer per round) rolls faster. Local
    training and options follow the reference's HeteroFL-based client (label split, Scaler,
    clipping at norm 1); tiers are evaluated at their prefix width."""
    name = "fedrolex"

    def __init__(self, step: float | None = None, max_width: float = 1.0, *, weighting: str = "clients",
                 label_split: bool = True, scaler: bool = True, clip_norm: float | None = 1.0,
                 dynamic: bool = False):
        if step is not None and not (isinstance(step, (int, float)) and step > 0):
            raise ValueError(f"step must be None (one channel per round) or a positive fraction, got {step!r}")
        check_weighting(weighting)
        self.step, self.max_width, self.weighting = step, max_width, weighting
        self._init_recipe(label_split, scaler, clip_norm, dynamic)

    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="clients"):
        """FedRolex (Alam, Liu, Yan & Zhang, NeurIPS 2022, "FedRolex: Model-heterogeneous
        federated learning with rolling sub-model extraction"), as its reference code trains it
        (AIoT-MLSys-Lab/FedRolex ``resnet_server.py``; details in ``slimkern.fl.rolex``): in
        round ``r`` a client keeping ``L`` of a layer's ``C`` channels trains the dense
        sub-matrix ``W[idx_out][:, idx_in]`` with ``idx = roll(arange(C), r mod C)[:L]`` per
        layer (one channel per round; a window that wraps is still one dense sub-matrix). Its
        update is keyed by a ``slimkern.fl.rolex.SubModel`` whose windows are those index sets
        (``rolex.windows_fn``). Each element is averaged over the clients that held it:
        ``weighting="clients"`` (default; the reference's ``combine`` uses ``K = 1`` for conv
        weights and per-element counts that cancel for the rest), or ``"samples"``."""
        return average(params, updates, windows, assigned, log, weighting=weighting)

    def round_switch(self, assigned, round_index):
        return SubModel(switch_cls().width(per_device_width(assigned)), round_index, self.step, self.max_width)

    def task(self, cid, assigned, round_index, seed, labels=None):
        sw = self._round_width(cid, assigned, round_index, seed)
        return SubModel(switch_cls().width(per_device_width(sw)), round_index, self.step, self.max_width,
                        self._labels(labels))
