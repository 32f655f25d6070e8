"""Pairwise resource costs ``R_l(c_l, c_{l+1})`` of a chain search space.

The same closed forms as ``slimkern.profile`` (one branch, batch and spatial sizes from one
shape pass on the ``meta`` device), written as functions of the channel counts of the groups a
layer reads and writes:

* conv: MACs ``= N H_o W_o c_out c_in k_h k_w`` (depthwise: ``N H_o W_o c k_h k_w``),
  params ``= c_out c_in k_h k_w (+ c_out)`` (depthwise ``c k_h k_w (+ c)``);
* linear: MACs ``= rows c_out c_in``, params ``c_out c_in (+ c_out)``; the fused classifier's
  bias is counted once;
* BN: params ``2c`` (affine), no MACs.

A layer reading ``g_l`` and writing ``g_{l+1}`` fills the pair table ``l``; a layer within one
group ``g_l`` (depthwise, BN, the stem, the classifier) is added to the column of pair
``l - 1`` (the row of pair 0 for the first group); constants go to pair 0. So
``R(c) = sum_l R[l, c_l, c_{l+1}]`` is exactly the profile's total (Berman et al., AOWS, Sec. 3;
Wang & Blaschko, Sec. 3).

Peak activation memory is a *maximum* over the nodes of the graph, not a sum: each node's live
tensors (the liveness of ``slimkern.profile``) involve one group or two adjacent ones, so
``peak(c) = max_l P[l, c_l, c_{l+1}]`` with ``P`` the per-pair maximum, and a budget
``peak(c) <= B`` forbids every pair above ``B`` -- an exact constraint, no multiplier needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from slimkern.nas.space import SearchSpace, _slim_groups

__all__ = ["CostModel", "cost_model"]

_KINDS = ("macs", "params", "peak_activation")


@dataclass
class _Layer:
    name: str
    kind: str          # conv | dwconv | linear | bn
    gin: str | None
    gout: str | None
    cin: int           # fixed input channels (when gin is None)
    cout: int          # fixed output channels (when gout is None)
    rows: int          # N * H_out * W_out (conv) or output rows (linear)
    k: int             # kernel elements
    bias: bool
    count_params: bool  # False for a module called a second time

    def cost(self, ci, co):
        """(macs, params) for input/output channel counts (numbers or broadcastable arrays)."""
        if self.kind == "bn":
            return 0 * co, (2 * co if self.bias else 0 * co)
        if self.kind == "dwconv":
            macs = self.rows * co * self.k
            params = co * self.k + (co if self.bias else 0)
        else:
            macs = self.rows * co * ci * self.k
            params = co * ci * self.k + (co if self.bias else 0)
        return macs, (params if self.count_params else 0 * params)


def _trace_layers(net: nn.Module, space: SearchSpace, input_size):
    """One meta shape pass over the 1.0x branch graph: layer descriptors and, per node, the live
    activations as ``(group or None, bytes per channel or bytes)`` terms (profile's liveness)."""
    from slimkern._branch import BranchGraph
    from slimkern.nn._base import SlimModule
    from slimkern.profile import _nbytes, walk_liveness
    from slimkern.switch import Switch

    bg = BranchGraph(net, "slimkern.nas")
    fused = bg.check_fusion(Switch([1.0]), "slimkern.nas")
    gm = bg.branch(Switch([1.0]), 0, meta=True)
    gm.eval()  # shapes only; batch-1 BN at 1x1 maps would refuse training mode
    p = next(iter(net.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    x = torch.empty(input_size, dtype=dtype, device="meta")
    mods = dict(gm.named_modules())
    group: dict[fx.Node, str | None] = {}
    term: dict[fx.Node, tuple[str | None, float]] = {}
    layers: list[_Layer] = []
    node_terms: list[tuple[str, list[tuple[str | None, float]]]] = []
    seen: set[str] = set()
    for step in walk_liveness(gm, x):
        n, val = step.node, step.value
        if n.op == "output":
            break
        slim = bg.modules.get(n.target) if n.op == "call_module" else None
        if not isinstance(slim, SlimModule):
            slim = None
        src = next((a for a in n.all_input_nodes), None)
        if slim is not None:
            gin, gout = _slim_groups(slim)
            group[n] = gout
            plain = mods[n.target]
            kind, shape = None, tuple(val.shape)
            if isinstance(plain, nn.Conv2d):
                kind = "dwconv" if getattr(slim, "depthwise", False) else "conv"
                rows, k = shape[0] * shape[2] * shape[3], math.prod(plain.kernel_size)
                bias = plain.bias is not None
                cin, cout = plain.in_channels, plain.out_channels
            elif isinstance(plain, nn.Linear):
                kind, rows, k = "linear", math.prod(shape) // shape[-1], 1
                bias, cin, cout = plain.bias is not None, plain.in_features, plain.out_features
            else:  # a BN (possibly Sequential(BN, activation))
                bn = plain[0] if isinstance(plain, nn.Sequential) else plain
                kind, rows, k, bias = "bn", 0, 0, bool(bn.affine)
                cin = cout = bn.num_features
            layers.append(_Layer(n.target, kind, gin, gout, cin, cout, rows, k, bias, n.target not in seen))
            seen.add(n.target)
        elif n.op == "placeholder":
            group[n] = None
        else:
            group[n] = group.get(src) if src is not None else None
        # liveness: slimkern.profile's walker; a live tensor costs bytes per channel of its group
        if step.allocated:
            b, _ = _nbytes(val)
            g = group[n]
            if g is not None and not (isinstance(val, torch.Tensor) and val.dim() >= 2):
                raise ValueError(f"node {n.name}: cannot tell the channel dimension of a grouped activation")
            term[n] = (g, b / val.shape[1]) if g is not None else (None, float(b))
        node_terms.append((n.name, [term[o] for o in step.live]))
    fusion_bias = fused.out_full if fused is not None and fused.bias is not None else 0
    return layers, node_terms, fusion_bias


class CostModel:
    """Resource of configurations of a :class:`SearchSpace`: exact totals and chain tables.

    ``table(kind)`` is ``[L-1, K, K]`` (``+inf`` on padded choices) with
    ``sum_l table[l, c_l, c_{l+1}]`` the configuration's MACs or params, or (``peak_activation``)
    ``max_l table[l, c_l, c_{l+1}]`` its peak activation bytes; ``evaluate(channels, kind)``
    gives the same figures for any ``{group: channels}`` (choices or not).
    """

    def __init__(self, space: SearchSpace, layers, node_terms, fusion_bias: int, input_size):
        self.space, self.layers, self.node_terms = space, layers, node_terms
        self.fusion_bias, self.input_size = int(fusion_bias), tuple(input_size)
        self._pos = {g: i for i, g in enumerate(space.groups)}
        self._tables: dict[str, np.ndarray] = {}

    # ---- exact figures ------------------------------------------------------------------
    latency = None  # a fitted slimkern.nas.LatencyModel (set_latency)

    def set_latency(self, model) -> None:
        """Uses a fitted :class:`~slimkern.nas.LatencyModel` for ``cost="latency"``."""
        from slimkern.nas.latency import LatencyModel
        if not isinstance(model, LatencyModel) or model.space != self.space:
            raise ValueError("set_latency takes a LatencyModel fitted on this cost model's search space")
        self.latency = model
        self._tables.pop("latency", None)

    def _check_kind(self, kind):
        if kind == "latency":
            if self.latency is None:
                raise ValueError("latency costs need a fitted latency model: time configurations with "
                                 "slimkern.nas.measure_latency, fit them with fit_latency and call set_latency; "
                                 "or use cost='macs', 'params' or 'peak_activation'")
            return
        if kind not in _KINDS:
            raise ValueError(f"cost must be one of {_KINDS + ('latency',)}, got {kind!r}")

    def _full_channels(self, channels) -> dict[str, int]:
        if hasattr(channels, "is_per_layer"):
            channels = {g: rs[0][1] for g, rs in channels._channels} if channels.is_per_layer else None
            if channels is None:
                raise ValueError("evaluate takes a per-layer switch or a {group: channels} mapping")
        missing = [g for g in self.space.groups if g not in channels]
        if missing:
            raise ValueError(f"configuration has no channels for groups {missing}")
        return {g: int(channels[g]) for g in self.space.groups}

    def evaluate(self, channels, kind: str = "macs"):
        """MACs, params or peak activation bytes (ints), or predicted latency in seconds (a float),
        of a configuration (``{group: channels}``)."""
        self._check_kind(kind)
        c = self._full_channels(channels)
        if kind == "latency":
            return self.latency.predict_channels(c)
        if kind == "peak_activation":
            return int(round(max(sum(coef * (c[g] if g is not None else 1) for g, coef in terms)
                                 for _, terms in self.node_terms)))
        total = self.fusion_bias if kind == "params" else 0
        for ly in self.layers:
            ci = c[ly.gin] if ly.gin is not None else ly.cin
            co = c[ly.gout] if ly.gout is not None else ly.cout
            macs, params = ly.cost(ci, co)
            total += macs if kind == "macs" else params
        return int(total)

    def of_path(self, path, kind: str = "macs") -> int:
        return self.evaluate(self.space.channels(path), kind)

    # ---- chain tables -------------------------------------------------------------------
    def table(self, kind: str = "macs") -> np.ndarray:
        """``[L-1, K, K]`` float64 pair table (``+inf`` where a choice is padding)."""
        self._check_kind(kind)
        if kind == "latency":
            return self.latency.table()
        if kind not in self._tables:
            self._tables[kind] = self._peak_table() if kind == "peak_activation" else self._sum_table(kind)
        return self._tables[kind]

    def _grid(self):
        sp = self.space
        K = sp.max_choices
        ch = np.zeros((sp.num_layers, K))
        pad = np.ones((sp.num_layers, K), dtype=bool)
        for i, cs in enumerate(sp.choices):
            ch[i, :len(cs)] = cs
            pad[i, :len(cs)] = False
        return ch, pad

    def _finish(self, t, pad):
        t[pad[:-1, :, None].repeat(t.shape[2], 2)] = np.inf
        t[pad[1:, None, :].repeat(t.shape[1], 1)] = np.inf
        return t

    def _sum_table(self, kind):
        sp = self.space
        L, K = sp.num_layers, sp.max_choices
        ch, pad = self._grid()
        t = np.zeros((L - 1, K, K))
        t[0] += self.fusion_bias if kind == "params" else 0
        pick = 0 if kind == "macs" else 1
        for ly in self.layers:
            gi = self._pos[ly.gin] if ly.gin is not None else None
            go = self._pos[ly.gout] if ly.gout is not None else None
            if gi is not None and go is not None and gi != go:
                t[gi] += ly.cost(ch[gi][:, None], ch[go][None, :])[pick]
                continue
            g = gi if gi is not None else go
            if g is None:
                t[0] += ly.cost(ly.cin, ly.cout)[pick]
                continue
            ci = ch[g] if ly.gin is not None else ly.cin
            co = ch[g] if ly.gout is not None else ly.cout
            v = np.broadcast_to(np.asarray(ly.cost(ci, co)[pick], dtype=np.float64), (K,))
            if g == 0:
                t[0] += v[:, None]
            else:
                t[g - 1] += v[None, :]
        return self._finish(t, pad)

    def _peak_table(self):
        sp = self.space
        L, K = sp.num_layers, sp.max_choices
        ch, pad = self._grid()
        t = np.zeros((L - 1, K, K))
        for name, terms in self.node_terms:
            gs = sorted({self._pos[g] for g, _ in terms if g is not None})
            if len(gs) > 2 or (len(gs) == 2 and gs[1] != gs[0] + 1):
                raise ValueError(f"peak activation is not a chain cost on this net: node {name!r} keeps "
                                 f"activations of groups {[sp.groups[i] for i in gs]} alive at once")
            if not gs:
                pairs = range(L - 1)
            elif len(gs) == 1:
                pairs = [p for p in (gs[0] - 1, gs[0]) if 0 <= p < L - 1]
            else:
                pairs = [gs[0]]
            for p in pairs:
                v = np.zeros((K, K))
                for g, coef in terms:
                    if g is None:
                        v += coef
                    elif self._pos[g] == p:
                        v += coef * ch[p][:, None]
                    else:
                        v += coef * ch[p + 1][None, :]
                t[p] = np.maximum(t[p], v)
        return self._finish(t, pad)


def cost_model(net: nn.Module, space: SearchSpace, input_size=(1, 3, 32, 32)) -> CostModel:
    """The :class:`CostModel` of ``net`` over ``space`` at ``input_size`` (batch included)."""
    from slimkern._branch import input_shape

    if not isinstance(space, SearchSpace):
        raise TypeError(f"space must be a SearchSpace (slimkern.nas.search_space(net)), got {type(space).__name__}")
    if not space.is_chain:
        raise ValueError("cost_model needs a chain search space; this one was built with require_chain=False "
                         "(its groups need not form a chain), so pairwise costs are not defined for it")
    input_size = input_shape(input_size)
    layers, node_terms, fusion = _trace_layers(net, space, input_size)
    return CostModel(space, layers, node_terms, fusion, input_size)
