"""``slimkern.profile``: MACs, parameters and peak activation memory of a switch, per branch.

Every branch of a switch is the net's graph with each slim layer replaced by a plain layer on
that branch's channel window (``slimkern._branch``); the device running branch ``i`` runs
exactly that graph. Shapes come from one pass on the ``meta`` device (no memory, no compute),
then closed forms per layer kind:

* ``Conv2d``:  MACs ``= N * C_out * H_out * W_out * (C_in / groups) * k_h * k_w``,
  params ``= C_out * (C_in / groups) * k_h * k_w (+ C_out bias)``;
* ``Linear``:  MACs ``= numel(out) * in_features``, params ``= out * in (+ out)``;
* ``BatchNorm``: params ``= 2 C`` (affine), MACs 0 (folds into the conv at deployment);
* activations, pooling, adds, flatten: no MACs, no parameters (the usual convention of the
  slimmable / ParaDiS papers, which count multiply-accumulates of conv and linear layers).

The fused classifier's bias is added once per switch, not per branch: it is counted in
``fusion_params`` and in the total, not in any branch. An epilogue after the fused layer
(WDSR's image skip conv and pixel shuffle, see ``slimkern._branch``) also runs once, where the
branches are fused: ``Profile.fusion`` profiles it, its parameters count in ``fusion_params``,
its MACs in ``macs`` and -- on the device that fuses, the convention of ``WDSR.branch_macs``
-- in ``max_device_macs``.

Peak activation memory of a branch: the graph runs node by node; a tensor is alive from the
node that makes it until its last reader has run (the input image included, parameters not).
In-place and view ops (``ReLU(inplace=True)``, ``view``, ``flatten`` ...) share their input's
storage. The peak is the largest sum of live tensor bytes while a node runs.

ParaDiS view (Ozerov et al.): the branches run in parallel on separate devices, so the
latency-relevant figure is ``max_device_macs`` (the busiest device), while ``macs`` is the
total work.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from slimkern._branch import BranchGraph, input_shape
from slimkern.nn.switching import as_switch
from slimkern.switch import Switch

__all__ = ["profile", "Profile", "ProfileTable", "BranchProfile", "LayerCost"]


@dataclass
class LayerCost:
    name: str
    kind: str
    input_shape: tuple
    output_shape: tuple
    macs: int
    params: int


@dataclass
class BranchProfile:
    index: int
    macs: int
    params: int
    peak_activation_bytes: int
    peak_activation_elements: int
    output_shape: tuple
    layers: list[LayerCost] = field(default_factory=list, repr=False)


@dataclass
class Profile:
    """Result of ``slimkern.profile``; totals over branches plus the per-device maxima."""

    switch: Switch | None
    input_size: tuple
    dtype: torch.dtype
    branches: list[BranchProfile]
    fusion_params: int
    fusion: BranchProfile | None = None  # the epilogue after the fused layer, run once

    @property
    def fusion_macs(self) -> int:
        """MACs done once where the branches are fused (the epilogue; 0 for a classifier)."""
        return self.fusion.macs if self.fusion is not None else 0

    @property
    def macs(self) -> int:
        """Total multiply-accumulates of the switch (all branches, the epilogue once)."""
        return sum(b.macs for b in self.branches) + self.fusion_macs

    @property
    def params(self) -> int:
        """Parameters the switch reads: all branches plus the fused bias and epilogue once."""
        return sum(b.params for b in self.branches) + self.fusion_params

    @property
    def peak_activation_bytes(self) -> int:
        """Sum over devices of each device's activation peak (all branches run at once), plus
        the epilogue's peak."""
        fp = self.fusion.peak_activation_bytes if self.fusion is not None else 0
        return sum(b.peak_activation_bytes for b in self.branches) + fp

    @property
    def max_device_macs(self) -> int:
        """MACs of the busiest device, which also runs the epilogue: the ParaDiS latency proxy."""
        return max(b.macs for b in self.branches) + self.fusion_macs

    @property
    def max_device_params(self) -> int:
        return max(b.params for b in self.branches)

    @property
    def max_device_peak_activation_bytes(self) -> int:
        """The largest peak of one branch or of the epilogue (they run one after the other)."""
        fp = [self.fusion.peak_activation_bytes] if self.fusion is not None else []
        return max([b.peak_activation_bytes for b in self.branches] + fp)

    def as_dict(self) -> dict:
        return {"switch": str(self.switch) if self.switch is not None else None,
                "input_size": list(self.input_size), "dtype": str(self.dtype),
                "macs": self.macs, "params": self.params, "peak_activation_bytes": self.peak_activation_bytes,
                "max_device_macs": self.max_device_macs, "max_device_params": self.max_device_params,
                "max_device_peak_activation_bytes": self.max_device_peak_activation_bytes,
                "fusion_params": self.fusion_params, "fusion_macs": self.fusion_macs,
                "branches": [{"macs": b.macs, "params": b.params,
                              "peak_activation_bytes": b.peak_activation_bytes} for b in self.branches]}

    def __str__(self) -> str:
        lines = [f"profile of {self.switch} at input {tuple(self.input_size)} ({self.dtype})",
                 f"{'branch':>6} {'MMACs':>10} {'params':>11} {'peak act KiB':>13}"]
        for b in self.branches:
            lines.append(f"{b.index:>6} {b.macs / 1e6:>10.3f} {b.params:>11,} {b.peak_activation_bytes / 1024:>13.1f}")
        if self.fusion is not None:
            f = self.fusion
            lines.append(f"{'fusion':>6} {f.macs / 1e6:>10.3f} {self.fusion_params:>11,} "
                         f"{f.peak_activation_bytes / 1024:>13.1f}")
        lines.append(f"{'total':>6} {self.macs / 1e6:>10.3f} {self.params:>11,} "
                     f"{self.peak_activation_bytes / 1024:>13.1f}")
        lines.append(f"max per device: {self.max_device_macs / 1e6:.3f} MMACs")
        return "\n".join(lines)


class ProfileTable(list):
    """``slimkern.profile`` of several switches: a list of :class:`Profile` (same order) that
    prints as one table, a row per switch."""

    def as_dict(self) -> dict:
        return {"switches": [p.as_dict() for p in self]}

    def __str__(self) -> str:
        if not self:
            return "profile: no switches"
        head = self[0]
        w = max(len("switch"), *(len(str(p.switch)) for p in self))
        lines = [f"profile at input {tuple(head.input_size)} ({head.dtype})",
                 f"{'switch':<{w}} {'branches':>8} {'MMACs':>10} {'max/device':>10} {'params':>11} "
                 f"{'peak act KiB':>13}"]
        for p in self:
            lines.append(f"{str(p.switch):<{w}} {len(p.branches):>8} {p.macs / 1e6:>10.3f} "
                         f"{p.max_device_macs / 1e6:>10.3f} {p.params:>11,} {p.peak_activation_bytes / 1024:>13.1f}")
        return "\n".join(lines)


def _is_switch_list(sw) -> bool:
    """A list of switches (``[Switch, "[0.5, 0.5]x", ...]``), not one switch given as a list of
    branch widths (``[0.5, 0.5]``)."""
    return isinstance(sw, (list, tuple)) and not isinstance(sw, Switch) and len(sw) > 0 and all(
        isinstance(s, (Switch, str)) for s in sw)


# ---- closed forms -------------------------------------------------------------------------

def _conv_cost(m: nn.Conv2d, out_shape) -> tuple[int, int]:
    n, cout, ho, wo = out_shape
    k = math.prod(m.kernel_size)
    per_out = (m.in_channels // m.groups) * k
    params = m.out_channels * per_out + (m.out_channels if m.bias is not None else 0)
    return n * cout * ho * wo * per_out, params


def _linear_cost(m: nn.Linear, out_shape) -> tuple[int, int]:
    params = m.out_features * m.in_features + (m.out_features if m.bias is not None else 0)
    return math.prod(out_shape) * m.in_features, params


def _bn_params(m) -> int:
    return 2 * m.num_features if m.affine else 0


def _module_cost(m: nn.Module, out_shape) -> tuple[str, int, int]:
    if isinstance(m, nn.Conv2d):
        return "conv2d", *_conv_cost(m, out_shape)
    if isinstance(m, nn.Linear):
        return "linear", *_linear_cost(m, out_shape)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", 0, _bn_params(m)
    if isinstance(m, nn.Sequential) and len(m) and isinstance(m[0], nn.modules.batchnorm._BatchNorm):
        return "batchnorm", 0, _bn_params(m[0])  # BN with a fused activation
    own = sum(p.numel() for p in m.parameters())
    if own:
        raise ValueError(f"profile has no closed form for {type(m).__name__} (a layer with parameters); "
                         "supported: Conv2d, Linear, BatchNorm")
    return type(m).__name__.lower(), 0, 0


# ---- activation liveness --------------------------------------------------------------------

_VIEW_METHODS = {"view", "flatten", "reshape", "squeeze", "unsqueeze", "contiguous", "expand", "view_as",
                 "relu_", "add_", "mul_", "clamp_", "sigmoid_", "hardtanh_", "detach"}
_VIEW_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, operator.getitem,
               operator.iadd, operator.imul, torch.relu_}


def _aliases_input(node: fx.Node, mod: nn.Module | None) -> bool:
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_module":
        return bool(getattr(mod, "inplace", False)) or isinstance(mod, (nn.Flatten, nn.Identity))
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCS
    return False


def _nbytes(v) -> tuple[int, int]:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size(), v.numel()
    if isinstance(v, (tuple, list)):
        b = e = 0
        for x in v:
            bb, ee = _nbytes(x)
            b, e = b + bb, e + ee
        return b, e
    return 0, 0


@dataclass
class LiveStep:
    """One node of :func:`walk_liveness`: its value, its module (``call_module``), its
    evaluated args, the storage owner of its output (itself when it allocated, the owner of
    its input when it is a view or in-place, None when it makes no tensor) and the owners
    whose storage is alive while it runs (its own output included)."""

    node: fx.Node
    value: object
    module: nn.Module | None
    args: tuple
    owner: fx.Node | None
    live: list[fx.Node]

    @property
    def allocated(self) -> bool:
        return self.owner is self.node


def walk_liveness(gm: fx.GraphModule, x: torch.Tensor, *more: torch.Tensor):
    """Runs ``gm`` on ``x`` (and ``more``, for graphs of several inputs; the meta device:
    shapes only) node by node and yields a
    :class:`LiveStep` per node; the last one is the ``output`` node (its value is the graph's
    output; it allocates nothing). A tensor is alive from the node that makes it until its
    last reader has run; views and in-place ops share their first input's storage. The one
    liveness rule of ``slimkern.profile`` and ``slimkern.nas`` costs."""
    mods = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pos = {n: k for k, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = pos[n]
    storage: dict[fx.Node, fx.Node] = {}  # node -> node that owns its storage
    live: dict[fx.Node, int] = {}  # owner -> last position its storage is needed
    interp = fx.Interpreter(gm)
    inputs = iter((x,) + more)
    for n in nodes:
        if n.op == "placeholder":
            args, val = (), next(inputs)
        else:
            args, kwargs = interp.fetch_args_kwargs_from_env(n)
            if n.op == "output":
                yield LiveStep(n, args[0], None, args, None, list(live))
                return
            val = getattr(interp, n.op)(n.target, args, kwargs)
        interp.env[n] = val
        mod = mods.get(n.target) if n.op == "call_module" else None
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        owner = None
        if src is not None and src in storage and _aliases_input(n, mod):
            owner = storage[n] = storage[src]
            live[owner] = max(live[owner], last_use.get(n, pos[n]))
        elif _nbytes(val)[0]:
            owner = storage[n] = n
            live[n] = last_use.get(n, pos[n])
        yield LiveStep(n, val, mod, args, owner, list(live))
        for o in [o for o, last in live.items() if last <= pos[n]]:  # storages nobody needs after n
            del live[o]


def _run_branch(gm: fx.GraphModule, x: torch.Tensor, index: int, *more: torch.Tensor) -> BranchProfile:
    size: dict[fx.Node, tuple[int, int]] = {}  # owner -> (bytes, elements)
    peak_b = peak_e = 0
    layers: list[LayerCost] = []
    macs = params = 0
    seen_params: set[str] = set()
    out_shape: tuple = ()
    for step in walk_liveness(gm, x, *more):
        n, val = step.node, step.value
        if n.op == "output":
            out_shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
            break
        if n.op == "call_module":
            args = step.args
            in_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            kind, lm, lp = _module_cost(step.module, tuple(val.shape))
            if n.target in seen_params:
                lp = 0  # a module called twice holds its parameters once
            seen_params.add(n.target)
            macs, params = macs + lm, params + lp
            if lm or lp:
                layers.append(LayerCost(n.target, kind, in_shape, tuple(val.shape), lm, lp))
        if step.allocated:
            size[n] = _nbytes(val)
        peak_b = max(peak_b, sum(size[o][0] for o in step.live))
        peak_e = max(peak_e, sum(size[o][1] for o in step.live))
    return BranchProfile(index, macs, params, peak_b, peak_e, out_shape, layers)


def profile(net: nn.Module, sw=None, input_size=(1, 3, 32, 32),
            dtype: torch.dtype | None = None) -> Profile | ProfileTable:
    """MACs, parameters and peak activation memory of ``net`` under switch ``sw``, per branch.

    Args:
        net: a net of slimkern layers (``slimmify`` output or a model built from slimkern.nn),
            or a plain model (then ``sw`` must be None or ``[1.0]``: one branch, the model).
            Train or eval mode, any batch size: the figures are those of the inference graph
            (BN in eval form) and the net's mode is left as it is.
        sw: a Switch, notation string (``"[0.5, 0.25, 0.25]x"``) or width; None = ``[1.0]``.
            A list of switches (Switch objects or strings) gives a :class:`ProfileTable`: one
            Profile per switch, printed as one table.
        input_size: the input shape, batch included, e.g. ``(1, 3, 32, 32)``.
        dtype: element type for activation bytes (default: the net's parameter dtype).

    Returns a ``Profile``: ``.branches[i]`` (``macs``, ``params``, ``peak_activation_bytes``,
    per-layer ``layers``), totals ``.macs``, ``.params`` (branches + fused bias once),
    ``.peak_activation_bytes`` (sum over devices) and the ParaDiS per-device maxima
    ``.max_device_macs``, ``.max_device_params``, ``.max_device_peak_activation_bytes``;
    ``.fusion``: the epilogue after the fused layer (WDSR's skip and pixel shuffle), or None.
    Nothing is computed on real data and the net is not modified.
    """
    if _is_switch_list(sw):
        return ProfileTable(profile(net, s, input_size, dtype) for s in sw)
    sw = Switch([1.0]) if sw is None else as_switch(sw)
    input_size = input_shape(input_size)
    bg = BranchGraph(net, "profile")
    if not bg.slim and sw != Switch([1.0]):
        raise ValueError(f"profile: {type(net).__name__} has no slimkern layers, so it only runs [1.0]x; got {sw}")
    fused = bg.check_fusion(sw, "profile", epilogue=True)
    if dtype is None:
        p = next(iter(net.parameters()), None)
        dtype = p.dtype if p is not None else torch.get_default_dtype()
    x = torch.empty(input_size, dtype=dtype, device="meta")
    branches = []
    for i in range(sw.num_branches):
        gm = bg.branch(sw, i, meta=True).eval()  # shapes only: a train-mode BN would refuse batch 1 at 1x1
        try:
            branches.append(_run_branch(gm, x, i))
        except ValueError:
            raise
        except Exception as e:
            raise RuntimeError(f"profile: the shape pass of branch {i} of {sw} failed at input {input_size} "
                               f"({type(e).__name__}: {e})") from e
    fusion_params = fused.out_full if fused is not None and fused.bias is not None else 0
    epi = bg.fusion(sw, meta=True)
    fusion = None
    if epi is not None:
        summed = torch.empty(branches[0].output_shape, dtype=dtype, device="meta")
        try:
            fusion = _run_branch(epi.eval(), x, -1, summed)
        except ValueError:
            raise
        except Exception as e:
            raise RuntimeError(f"profile: the shape pass of the fusion epilogue of {sw} failed at input "
                               f"{input_size} ({type(e).__name__}: {e})") from e
        fusion_params += fusion.params
    return Profile(sw, input_size, dtype, branches, fusion_params, fusion)
