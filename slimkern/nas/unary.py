"""Unary statistics ``L_l(c_l)``: per layer and choice, the loss attributed to that choice.

OWS/AOWS (Berman et al., CVPR 2020, Sec. 3.2) estimate the loss of a configuration as a sum
over layers, ``L(c) ~ sum_l L_l(c_l)``, from the losses of random configurations met during
slimmable training. For every image of a batch trained with a sampled configuration ``c``,
each layer ``l`` records for its choice ``c_l`` the value

* ``attribution="aows"``: ``(loss_rand - loss_max) / L`` -- the image's excess loss over the
  widest configuration, split evenly over the ``L`` layers (AOWS's update, with the sign of
  a cost: AOWS maximises ``-(loss_rand - loss_max) / L``, our Viterbi minimises);
* ``attribution="loss"``: ``loss_rand / L``.

``L_l(k)`` is the moving average of the last ``window`` values recorded at ``(l, k)`` (AOWS:
``window = 1e5``); a choice never recorded has the value ``fill`` (AOWS: 0, the empty meter's
average). Padded choices (groups with fewer choices than the widest) are ``+inf``.
"""
from __future__ import annotations

import math
import numbers
from collections import deque

import numpy as np
import torch

from slimkern.nas.space import SearchSpace

__all__ = ["ATTRIBUTIONS", "UnaryStats"]

ATTRIBUTIONS = ("aows", "loss")


def _per_image(x, what) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty: give one loss per image")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has non-finite values")
    return a


class UnaryStats:
    """Windowed moving averages of attributed losses, one per (group, choice).

    Args:
        space: the :class:`SearchSpace` (groups and choices).
        window: number of most recent values each average keeps (AOWS: 100000).
        attribution: ``"aows"`` or ``"loss"`` (module docstring).
        fill: the value of a choice never recorded.
    """

    def __init__(self, space: SearchSpace, window: int = 100000, attribution: str = "aows", fill: float = 0.0):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        if isinstance(fill, bool) or not isinstance(fill, numbers.Real) or not math.isfinite(fill):
            raise ValueError(f"fill must be a finite number, got {fill!r}")
        self.space, self.window, self.attribution, self.fill = space, int(window), attribution, float(fill)
        self._hist = [[deque() for _ in ch] for ch in space.choices]
        self._sum = np.zeros((space.num_layers, space.max_choices))
        self._since_exact = np.zeros((space.num_layers, space.max_choices), dtype=np.int64)

    # ---- recording ----------------------------------------------------------------------
    def attribute(self, loss_rand, loss_max=None) -> np.ndarray:
        """The per-image value each layer records (see the module docstring)."""
        r = _per_image(loss_rand, "loss_rand")
        L = self.space.num_layers
        if self.attribution == "loss":
            return r / L
        if loss_max is None:
            raise ValueError("attribution 'aows' needs loss_max (the widest configuration's per-image loss)")
        m = _per_image(loss_max, "loss_max")
        if m.shape != r.shape:
            raise ValueError(f"loss_rand and loss_max need one value per image each, got {r.size} and {m.size}")
        return (r - m) / L

    def update(self, path, loss_rand, loss_max=None) -> None:
        """Records a batch trained with configuration ``path`` (choice indices, or a per-layer
        switch / ``{group: channels}`` of the space): per-image losses of that configuration
        (``loss_rand``) and of the widest one (``loss_max``)."""
        if not isinstance(path, (list, tuple, np.ndarray, torch.Tensor)):
            path = self.space.path(path)
        path = [int(i) for i in path]
        self.space.channels(path)  # validates
        vals = self.attribute(loss_rand, loss_max)
        for l, k in enumerate(path):
            self._push(l, k, vals)

    def _push(self, l, k, vals):
        h = self._hist[l][k]
        W = self.window
        if vals.size >= W:
            h.clear()
            h.extend(vals[-W:].tolist())
            self._sum[l, k] = math.fsum(h)
            self._since_exact[l, k] = 0
            return
        s = float(vals.sum())
        h.extend(vals.tolist())
        drop = len(h) - W
        for _ in range(max(0, drop)):
            s -= h.popleft()
        self._sum[l, k] += s
        self._since_exact[l, k] += vals.size
        if self._since_exact[l, k] >= W:  # bound the drift of the running sum
            self._sum[l, k] = math.fsum(h)
            self._since_exact[l, k] = 0

    # ---- reading ------------------------------------------------------------------------
    def counts(self) -> np.ndarray:
        """``[L, K]`` number of values each average holds (0 on padding)."""
        c = np.zeros((self.space.num_layers, self.space.max_choices), dtype=np.int64)
        for l, hs in enumerate(self._hist):
            for k, h in enumerate(hs):
                c[l, k] = len(h)
        return c

    def unary(self) -> np.ndarray:
        """``[L, K]`` float64 moving averages; ``fill`` where nothing was recorded, ``+inf`` on padding."""
        n = self.counts()
        out = np.full(n.shape, np.inf)
        for l, ch in enumerate(self.space.choices):
            k = len(ch)
            out[l, :k] = np.where(n[l, :k] > 0, self._sum[l, :k] / np.maximum(n[l, :k], 1), self.fill)
        return out

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"window": self.window, "attribution": self.attribution, "fill": self.fill,
                "groups": list(self.space.groups), "choices": [list(c) for c in self.space.choices],
                # tensors, not NumPy arrays: checkpoints load with torch.load(weights_only=True)
                "history": [[torch.tensor(list(h), dtype=torch.float64) for h in hs] for hs in self._hist]}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("groups", ())) != list(self.space.groups) or \
                [tuple(c) for c in state.get("choices", ())] != list(self.space.choices):
            raise ValueError("these unary statistics were recorded on another search space "
                             f"(groups {state.get('groups')}, choices {state.get('choices')})")
        self.window, self.attribution, self.fill = int(state["window"]), state["attribution"], float(state["fill"])
        self._sum[:] = 0
        self._since_exact[:] = 0
        for l, hs in enumerate(state["history"]):
            for k, arr in enumerate(hs):
                h = deque(torch.as_tensor(arr, dtype=torch.float64).reshape(-1)[-self.window:].tolist())
                self._hist[l][k] = h
                self._sum[l, k] = math.fsum(h)

    @classmethod
    def from_state_dict(cls, space: SearchSpace, state: dict) -> "UnaryStats":
        st = cls(space, int(state["window"]), state["attribution"], float(state["fill"]))
        st.load_state_dict(state)
        return st
