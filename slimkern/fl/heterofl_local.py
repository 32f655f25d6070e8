"""HeteroFL's local-training recipe and task options (shared by HeteroFL and FedRolex).

What the reference code does beyond the nested average (diaoenmao/HeteroFL, ``fed.py``,
``models/conv.py``, ``models/resnet.py``, ``train_classifier_fed.py``; Flower's
``baselines/heterofl`` does the same; FedRolex's reference, built on HeteroFL's code,
trains its clients the same way, ``resnet_client.py``):

* **label split** (``label_split=True``): a client holding data of the labels ``Y_k`` only

  - masks the logits of the other classes in its local loss,
    ``out = out.masked_fill(label_mask == 0, 0)`` (filled with 0, not -inf: the reference's
    choice; the absent classes then get no gradient from the loss), and
  - uploads the classifier rows (weight rows and bias entries) of ``Y_k`` only, so the
    server averages row ``c`` over the clients that hold label ``c``
    (``param_idx[m][k][0][label_split]`` in ``combine``).
  A client that holds every label of the training set is not restricted.
* **Scaler** (``scaler=True``): during local training every sliced hidden layer's output
  is divided by the client's rate ``p`` (``Scaler(rate)``: ``x / rate`` in training, the
  identity in evaluation), placed after each convolution as in the reference.
* **gradient clipping** (``clip_norm=1.0``): ``clip_grad_norm_(params, 1)`` before every
  local SGD step.
* **dynamic rates** (``dynamic=False``; the reference's ``model_split_mode='dynamic'``):
  every round each client's width is re-drawn from the population of client widths (so
  with the tier fractions as probabilities), seeded by ``(seed, round, client)``;
  ``'fix'`` (the default) keeps each client at its tier's width.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from slimkern.fl.rolex import SubModel

__all__ = ["HeteroFLRecipe", "mask_absent_logits", "scaler_hooks", "dynamic_switch"]


def mask_absent_logits(logits: torch.Tensor, labels: Sequence[int] | None) -> torch.Tensor:
    """HeteroFL's ``out.masked_fill(label_mask == 0, 0)``: logits of classes not in
    ``labels`` become 0 (``labels=None``: unchanged)."""
    if labels is None:
        return logits
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(labels), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, 0)


@contextlib.contextmanager
def scaler_hooks(net: torch.nn.Module, rate: float) -> Iterator[None]:
    """HeteroFL's ``Scaler(rate)`` on every sliced hidden layer of ``net``: while the
    context is open, a layer's output is divided by ``rate`` in training mode."""
    from slimkern.nn._base import ChannelMixin
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    handles = []

    def hook(mod, inp, out):
        return out / rate if mod.training else out

    try:
        for m in net.modules():
            if isinstance(m, ChannelMixin) and m.slice_out:
                handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def dynamic_switch(cid: int, assigned: Mapping[int, object], round_index: int, seed: int):
    """The reference's ``make_model_rate`` in ``'dynamic'`` mode: a width drawn for client
    ``cid`` this round from the population of assigned switches (one entry per client, so
    with the tier fractions as probabilities)."""
    pool = sorted(assigned.values(), key=str)
    rng = np.random.default_rng([int(seed), int(round_index), int(cid), 13])
    return pool[int(rng.integers(len(pool)))]


class HeteroFLRecipe:
    """Options of HeteroFL's reference local training (module docstring), mixed into the
    HeteroFL and FedRolex strategies; defaults are the reference's."""

    def _init_recipe(self, label_split: bool = True, scaler: bool = True, clip_norm: float | None = 1.0,
                     dynamic: bool = False) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
        self.label_split, self.scaler, self.clip_norm, self.dynamic = bool(label_split), bool(scaler), \
            clip_norm, bool(dynamic)

    def _round_width(self, cid, assigned, round_index, seed):
        sw = assigned[cid]
        return dynamic_switch(cid, assigned, round_index, seed) if self.dynamic else sw

    def _labels(self, labels):
        return tuple(labels) if (self.label_split and labels is not None) else None

    # -- local-training hooks used by slimkern.fl.simulate ---------------------------------
    def train_logits(self, logits: torch.Tensor, key) -> torch.Tensor:
        if self.label_split and isinstance(key, SubModel):
            return mask_absent_logits(logits, key.labels)
        return logits

    def local_context(self, net, switch):
        if not self.scaler:
            return contextlib.nullcontext()
        return scaler_hooks(net, max(b for _, b in switch.branches))
