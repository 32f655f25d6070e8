"""HeteroFL: nested prefix sub-networks, averaged per element over the clients holding it."""
from __future__ import annotations

from slimkern.fl import validate as _validate
from slimkern.fl.aggregate import average
from slimkern.fl.heterofl_local import HeteroFLRecipe
from slimkern.fl.rolex import SubModel
from slimkern.fl.rules.base import Rule, check_weighting

__all__ = ["HeteroFL"]


class HeteroFL(HeteroFLRecipe, Rule):
    """Prefix sub-networks ``[p]`` with ``p`` the client's per-device width (Diao et al. 2021),
    trained and averaged as the reference code does (``slimkern.fl.heterofl_local``): each element
    the plain mean over the clients holding it (``weighting="clients"``; ``"samples"``
    weights by sample counts), label split, the Scaler, gradient clipping at norm 1, and
    ``dynamic=True`` to re-draw every client's width each round."""
    name = "heterofl"

    def __init__(self, *, weighting: str = "clients", label_split: bool = True, scaler: bool = True,
                 clip_norm: float | None = 1.0, dynamic: bool = False):
        check_weighting(weighting)
        self.weighting = weighting
        self._init_recipe(label_split, scaler, clip_norm, dynamic)

    @staticmethod
    def combine(params, updates, windows, assigned=None, log=None, weighting="clients"):
        """HeteroFL (Diao, Ding & Tarokh, ICLR 2021, "HeteroFL: Computation and communication
        efficient federated learning for heterogeneous clients"): client k trains the width-p_k
        prefix sub-network ``W[:p_k C_out, :p_k C_in]``; each element is averaged over the
        clients whose prefix contains it; elements nobody trained keep their value.

        Weighting follows the reference code (diaoenmao/HeteroFL ``fed.py``, ``combine``: the
        client values are summed and ``count += 1`` per element, then divided; Flower's
        ``baselines/heterofl`` does the same): ``weighting="clients"`` (default) is the plain
        mean ``W[e] = (1/|K_e|) sum_{k in K_e} W_k[e]`` over the clients ``K_e`` holding ``e``;
        ``weighting="samples"`` weights by sample counts, ``sum n_k W_k[e] / sum n_k``. With
        label split (``slimkern.fl.heterofl_local``) a client does not hold the classifier rows of
        labels it has no data for, so those rows average over the clients that do. Prefix
        switches are checked when the switch exposes ``branches``: an update of a non-prefix
        switch is rejected with the reason."""
        updates, pre = _validate.reject_where(updates, lambda u: _validate.prefix_problem(u.switch, "heterofl"),
                                              log)
        return average(params, updates, windows, assigned, log, pre, weighting)

    def task(self, cid, assigned, round_index, seed, labels=None):
        sw = self._round_width(cid, assigned, round_index, seed)
        labels = self._labels(labels)
        return sw if labels is None else SubModel(sw, labels=labels)
