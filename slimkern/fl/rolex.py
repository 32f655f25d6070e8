"""Dense sub-models from per-layer index sets (FedRolex), and the client's re-indexed copy.

FedRolex (Alam, Liu, Yan & Zhang, NeurIPS 2022, "FedRolex: Model-heterogeneous federated
learning with rolling sub-model extraction"), as its reference code trains it
(AIoT-MLSys-Lab/FedRolex, ``resnet_server.py``, ``split_model`` / ``distribute`` / ``combine``):

* per layer with ``C`` output channels and a client keeping ``L`` of them, in round ``r``

      roll = r mod C                                   (one channel per round)
      idx  = torch.roll(torch.arange(C), roll)[:L]     i.e. idx_j = (j - roll) mod C

  so the window starts at channel ``C - roll`` and wraps past the last channel;
* the client's sub-model is the *dense* gather ``W[idx_out][:, idx_in]`` of every weight
  (``b[idx_out]`` for biases and BN affine parameters): a wrapped window is one dense
  ``L_out x L_in`` sub-matrix, cross blocks included -- not two diagonal blocks;
* the server scatters every element back to where it was gathered from and averages it
  over the clients that held it (``combine``: ``K = 1`` for conv weights; the historical
  counts it uses as weights for 1-D and linear parameters are one number per *element*,
  equal for every client holding it, so they cancel in the mean -- we take the plain
  per-element mean over clients, ``weighting="clients"``).

The paper (Sec. 3.2) describes the window as advancing by one channel per round too; it
rolls forward (``[r, r + L)``) where the code rolls backward (``C - roll``): we follow the
code. ``L`` is the layer's channel count of the client's prefix switch (``round(p C)``, the
house rounding; the reference uses ``ceil(p C)``), so the client's sub-model is exactly
the prefix-``p`` network of a *re-indexed* copy of the global model: this module maps
the index sets onto the prefix windows (``SubModel.local``), the client trains the prefix
switch with the ordinary slim layers, and only the ``L_out x L_in`` elements travel.

A fractional ``step`` (fraction of each layer's channels per round) is kept as an option:
``roll = round(r * step * C) mod C``.

A ``SubModel`` is also how HeteroFL's label split restricts an upload to the classifier
rows of the labels a client holds (``labels``); see ``slimkern.fl.heterofl_local``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["SubModel", "rolled_indices", "layer_roll", "submodel_windows", "windows_fn",
           "train_switch", "download_key", "local_key", "to_local", "from_local", "forget_rounds"]


def layer_roll(round_index: int, channels: int, step: float | None = None) -> int:
    """The roll of a layer of ``channels`` channels in round ``round_index``: ``r mod C``
    (one channel per round, the reference), or ``round(r * step * C) mod C`` for a
    fractional ``step``."""
    if step is None:
        return int(round_index) % channels
    return int(round(round_index * float(step) * channels)) % channels


def rolled_indices(channels: int, keep: int, roll: int) -> torch.Tensor:
    """``torch.roll(torch.arange(channels), roll)[:keep]`` (FedRolex's ``split_model``)."""
    if not 0 < keep <= channels:
        raise ValueError(f"cannot keep {keep} of {channels} channels")
    return torch.roll(torch.arange(channels), int(roll))[:keep]


@dataclass(frozen=True)
class SubModel:
    """What one client trains and sends, in the global model's coordinates.

    ``switch``: the prefix switch the client trains on its (re-indexed) copy.
    ``round``: FedRolex's round index (``None``: no rolling, the prefix itself, HeteroFL).
    ``step``: ``None`` for one channel per round, or a fraction of each layer per round.
    ``max_width``: the rolling range (channels of ``Switch.width(max_width)`` per layer).
    ``labels``: classifier rows the *upload* carries (HeteroFL's label split); the client
    still receives and runs every row.
    """
    switch: Any
    round: int | None = None
    step: float | None = None
    max_width: float = 1.0
    labels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(sorted(int(i) for i in self.labels)))
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be a positive fraction of the channels or None, got {self.step}")

    def download(self) -> "SubModel":
        """The sub-model the client receives and trains (every classifier row)."""
        return SubModel(self.switch, self.round, self.step, self.max_width, None)

    def local(self) -> "SubModel":
        """The same elements in the client's re-indexed copy: the prefix windows."""
        return SubModel(self.switch, None, None, self.max_width, self.labels)

    def __str__(self) -> str:
        s = str(self.switch)
        if self.round is not None:
            s += f" rolled@{self.round}" + ("" if self.step is None else f"x{self.step:g}")
        if self.labels is not None:
            s += " labels " + ",".join(map(str, self.labels))
        return s


def _output_layers(net) -> set[str]:
    """Names of the layers whose outputs are the classes (never sliced, input sliced)."""
    from slimkern.nn._base import ChannelMixin
    return {n for n, m in net.named_modules()
            if isinstance(m, ChannelMixin) and not m.slice_out and m.slice_in}


def submodel_windows(net, key: SubModel) -> dict[str, list[tuple]]:
    """``name -> [window]`` of the trainable parameters ``key`` covers, in the full model.

    Index-set windows are tuples of index tensors broadcast against each other (``idx_out[:,
    None], idx_in[None, :]``) followed by full slices, so ``W[window]`` is the dense gather
    ``W[idx_out][:, idx_in]`` in the order of the index sets; that order matches the prefix
    windows of ``key.local()`` element for element.
    """
    from slimkern.nn import parameter_ranges
    from slimkern.switch import Switch
    pre = parameter_ranges(net, key.switch, buffers=False)
    if any(len(w) != 1 for w in pre.values()):
        raise ValueError(f"a sub-model needs a one-branch switch, got {key.switch}")
    mx = parameter_ranges(net, Switch.width(key.max_width), buffers=False) if key.round is not None else None
    heads = _output_layers(net) if key.labels is not None else set()
    lab = torch.tensor(key.labels, dtype=torch.long) if key.labels is not None else None
    out: dict[str, list[tuple]] = {}
    for name, (win,) in pre.items():
        dims: list = list(win)
        if mx is not None:
            for d, s in enumerate(win):
                m = mx[name][0][d]
                if s == m or not isinstance(s, slice) or s.start not in (0, None):
                    continue  # not a sliced channel dim (or the window is the whole range)
                C, L = m.stop - (m.start or 0), s.stop
                dims[d] = rolled_indices(C, L, layer_roll(key.round, C, key.step))
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if lab is not None and owner in heads:
            dims[0] = lab
        tens = [d for d, s in enumerate(dims) if isinstance(s, torch.Tensor)]
        if tens:
            k = len(tens)
            if tens != list(range(tens[0], tens[0] + k)):
                # torch moves non-adjacent advanced indices to the front: keep them adjacent
                raise ValueError(f"parameter {name!r}: index sets must be adjacent dims, got {tens}")
            for j, d in enumerate(tens):
                shape = [1] * k
                shape[j] = -1
                dims[d] = dims[d].view(shape)
        out[name] = [tuple(dims)]
    return out


def windows_fn(net):
    """The ``switch -> windows`` callable of an ``Aggregator`` that also understands
    ``SubModel`` keys (plain switches go to ``parameter_ranges``)."""
    from slimkern.nn import parameter_ranges

    def windows(sw) -> Mapping[str, list]:
        if isinstance(sw, SubModel):
            if sw.round is None and sw.labels is None:
                return parameter_ranges(net, sw.switch)
            return submodel_windows(net, sw)
        return parameter_ranges(net, sw)
    return windows


def train_switch(key):
    """The switch the client runs on its local copy."""
    return key.switch if isinstance(key, SubModel) else key


def download_key(key):
    """The key of what travels down (every classifier row)."""
    return key.download() if isinstance(key, SubModel) else key


def local_key(key):
    """The key of the uploaded elements in the client's re-indexed copy."""
    return key.local() if isinstance(key, SubModel) else key


def forget_rounds(agg, before: int) -> int:
    """Drops the aggregator's cached layouts of rolled keys of rounds ``< before`` (a rolled
    key is used in its own round only; without this a long run would keep one index vector
    per round and width). Returns how many were dropped."""
    cache = getattr(agg, "_layouts", None)
    if not isinstance(cache, dict):
        return 0
    old = [k for k in cache if isinstance(k, SubModel) and k.round is not None and k.round < before]
    for k in old:
        del cache[k]
    return len(old)


def to_local(agg, flat: torch.Tensor, key) -> torch.Tensor:
    """The client's copy: the global flat parameters with the dense sub-model gathered into
    the prefix windows (``flat`` itself when nothing is re-indexed)."""
    if not isinstance(key, SubModel) or key.round is None:
        return flat
    down = key.download()
    out = flat.clone()
    out[agg.layout(down.local()).index] = flat[agg.layout(down).index]
    return out


def from_local(agg, flat_local: torch.Tensor, key) -> torch.Tensor:
    """The upload (flat, in ``agg.layout(key)`` order) read from the client's copy."""
    return flat_local[agg.layout(local_key(key)).index].clone()
