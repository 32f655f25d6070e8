"""``slimkern.slimmify``: turn an ordinary PyTorch model into a slimmable / ParaDiS net.

The model is traced with ``torch.fx``. Every tensor in the graph carries the channels of some
*width group*; a union-find over the graph ties groups that must be sliced alike:

* a conv / linear layer starts a new group for its output (named after the layer);
  a depthwise conv (``groups == in == out``) and a BatchNorm keep their input's group;
* an elementwise op with several tensor operands (residual ``add``, ``mul`` of an SE gate,
  ...) unions its operands' groups -- both sides of a residual add must hold the same
  channels under every switch;
* activations, pooling, dropout, flatten / view keep their input's group.

The image input's group and the groups reaching the graph's output (the class logits) are
never sliced: the first layers get ``slice_in=False``, the classifier ``slice_out=False``
(a *fused* layer summing branch partial logits, the ParaDiS fusion). Every other conv /
linear / BN becomes ``SlimConv2d`` / ``SlimLinear`` / ``SwitchableBatchNorm2d`` (or
``SlimBatchNorm1d``) with ``in_group``/``out_group``/``group`` set to the group's name, so
per-layer switches (``Switch.from_channels``) name groups, not layers.

The model's channel counts become the base (1.0x) width. With ``max_width > 1`` sliced sides
are allocated ``round(max_width * C)`` channels; the original weights fill the 1.0x prefix
(and the BN affine prefix and a ``[1.0]x`` statistics row), so ``Switch([1.0])`` in eval mode
reproduces the original model.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimkern.nn._base import SlimModule
from slimkern.nn.batchnorm import SlimBatchNorm1d, SwitchableBatchNorm2d
from slimkern.nn.conv import SlimConv2d
from slimkern.nn.linear import SlimLinear
from slimkern.nn.net import SlimNet
from slimkern.switch import Switch

__all__ = ["slimmify", "SlimGraphModule"]


class SlimGraphModule(SlimNet, fx.GraphModule):
    """What ``slimmify`` returns: the traced model (a ``torch.fx.GraphModule`` with the
    original module names, so state-dict keys keep the model's names) whose conv / linear /
    BN layers are slimkern layers, with the ``SlimNet`` switch methods (``set_switch``,
    ``use_switch``, ``forward_switches``, ...). ``width_groups`` maps each width group to the
    layers in it."""

    def __reduce__(self):
        # GraphModule pickles into a plain GraphModule; rebuild this class around it
        fn, args = super().__reduce__()
        return (_rebuild_slim, (fn, args, getattr(self, "width_groups", {})))


def _rebuild_slim(fn, args, width_groups):
    gm = fn(*args)
    net = SlimGraphModule(gm, gm.graph, class_name=type(gm).__name__)
    net.width_groups = width_groups
    net.train(gm.training)
    return net


# parameter-free torch.nn modules that keep channels as they are
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                 nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
                 nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Flatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample)
_PASS_FUNCS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
               F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout2d,
               F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
               torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.flatten, torch.clamp,
               torch.clip, torch.nn.functional.pad, operator.neg, operator.pos, torch.neg, torch.reshape}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "flatten", "view", "reshape", "contiguous",
                 "clamp", "clamp_", "clone", "detach", "neg", "float", "half", "to", "type_as", "abs"}
_ELEMENTWISE_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                      operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
                      torch.div, torch.maximum, torch.minimum}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "expand_as"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_META_METHODS = {"size", "dim", "numel"}


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}
        self.channels: dict[int, tuple[int, str]] = {}  # root -> (count, who said so)

    def new(self) -> int:
        e = len(self.parent)
        self.parent[e] = e
        return e

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def set_channels(self, e: int, c: int, who: str) -> None:
        r = self.find(e)
        known = self.channels.get(r)
        if known is not None and known[0] != c:
            raise ValueError(f"slimmify: {who} has {c} channels but they are tied to {known[1]} with {known[0]} "
                             "channels")
        if known is None:
            self.channels[r] = (c, who)

    def union(self, a: int, b: int, who: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ca, cb = self.channels.get(ra), self.channels.get(rb)
        if ca is not None and cb is not None and ca[0] != cb[0]:
            raise ValueError(f"slimmify: {who} ties {ca[1]} ({ca[0]} channels) to {cb[1]} ({cb[0]} channels); "
                             "only equal channel counts can share a width group")
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        self.parent[drop] = keep
        if keep not in self.channels and drop in self.channels:
            self.channels[keep] = self.channels[drop]
        self.channels.pop(drop, None)
        return keep


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _describe(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"node {n.name!r} ({n.op} {t})"


class _Analysis:
    """Width groups of a traced model (see module docstring)."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.modules = dict(model.named_modules())
        self.uf = _UnionFind()
        self.val: dict[fx.Node, int | None] = {}
        self.layers: dict[str, tuple[int | None, int]] = {}  # target -> (in elem, out elem)
        self.image: list[int] = []
        self.outputs: list[int] = []
        self.order: list[str] = []  # layer targets in graph order
        for n in graph.nodes:
            self.val[n] = self._visit(n)

    def _tensor_args(self, n: fx.Node) -> list[int]:
        return [self.val[a] for a in n.all_input_nodes if self.val.get(a) is not None]

    def _first(self, n: fx.Node) -> int | None:
        a = n.args[0] if n.args else None
        return self.val.get(a) if isinstance(a, fx.Node) else None

    def _visit(self, n: fx.Node) -> int | None:
        uf = self.uf
        if n.op == "placeholder":
            e = uf.new()
            self.image.append(e)
            return e
        if n.op == "output":
            def collect(a):
                if isinstance(a, fx.Node):
                    if self.val.get(a) is not None:
                        self.outputs.append(self.val[a])
                elif isinstance(a, (tuple, list)):
                    for b in a:
                        collect(b)
                elif isinstance(a, dict):
                    for b in a.values():
                        collect(b)
            collect(n.args[0])
            return None
        if n.op == "get_attr":
            raise ValueError(f"slimmify: the forward reads the tensor {n.target!r} directly ({_describe(n)}); "
                             "only parameters held by Conv2d / Linear / BatchNorm layers can be sliced")
        if n.op == "call_module":
            return self._module(n, self.modules[n.target])
        args = self._tensor_args(n)
        if not args:
            return None
        if n.op == "call_method" and n.target in _META_METHODS:
            return None
        if n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device"):
            return None
        if n.op == "call_function" and n.target in (torch.cat, torch.concat, torch.stack):
            raise ValueError(f"slimmify: channel concatenation ({_describe(n)}) is not supported: slicing both "
                             "inputs of a concat cannot keep one contiguous channel range per branch")
        if ((n.op == "call_function" and n.target in _ELEMENTWISE_FUNCS)
                or (n.op == "call_method" and n.target in _ELEMENTWISE_METHODS)):
            e = args[0]
            for o in args[1:]:
                e = uf.union(e, o, _describe(n))
            return e
        if ((n.op == "call_function" and n.target in _PASS_FUNCS)
                or (n.op == "call_method" and n.target in _PASS_METHODS)):
            return self._first(n) if self._first(n) is not None else args[0]
        if (n.op == "call_method" and n.target in _REDUCE) or (
                n.op == "call_function" and n.target in (torch.mean, torch.sum, torch.amax)):
            dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            dims = [dims] if isinstance(dims, int) else dims
            if dims is not None and all(isinstance(d, int) and d >= 2 for d in dims):
                return self._first(n)
            raise ValueError(f"slimmify: {_describe(n)} reduces over dims {dims}; only reductions over spatial "
                             "dims (>= 2) keep the channels sliceable")
        raise ValueError(f"slimmify: {_describe(n)} is not known to keep channels aligned, so it cannot be "
                         "sliced (supported: conv/linear/BN, activations, pooling, dropout, flatten/view, "
                         "elementwise add/mul, spatial mean)")

    def _module(self, n: fx.Node, m: nn.Module) -> int | None:
        uf, name = self.uf, n.target
        who = f"layer {name!r} ({type(m).__name__})"
        x = self._first(n)
        if isinstance(m, SlimModule):
            raise ValueError(f"slimmify: {who} is already a slimkern layer; slimmify a plain model")
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise ValueError(f"slimmify: {who} uses padding_mode={m.padding_mode!r}; only 'zeros' is supported")
            if isinstance(m.padding, str):
                raise ValueError(f"slimmify: {who} uses padding={m.padding!r}; give numeric padding")
            if m.groups != 1 and not _is_depthwise(m):
                raise ValueError(f"slimmify: {who} is a grouped conv (groups={m.groups}, {m.in_channels} -> "
                                 f"{m.out_channels} channels) that is not depthwise; it cannot be sliced")
            uf.set_channels(x, m.in_channels, who)
            if _is_depthwise(m):
                out = x
            else:
                out = uf.new()
                uf.set_channels(out, m.out_channels, who)
            self.layers[name] = (x, out)
            self.order.append(name)
            return out
        if isinstance(m, nn.Linear):
            known = uf.channels.get(uf.find(x))
            if known is not None and known[0] != m.in_features:
                raise ValueError(f"slimmify: {who} reads {m.in_features} features but its input carries "
                                 f"{known[0]} channels (from {known[1]}): a flatten over spatial positions "
                                 "cannot be sliced by channel; pool to 1x1 before the linear layer")
            uf.set_channels(x, m.in_features, who)
            out = uf.new()
            uf.set_channels(out, m.out_features, who)
            self.layers[name] = (x, out)
            self.order.append(name)
            return out
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if not m.track_running_stats:
                raise ValueError(f"slimmify: {who} has track_running_stats=False; switchable BN keeps running "
                                 "statistics per switch")
            uf.set_channels(x, m.num_features, who)
            self.layers[name] = (x, x)
            self.order.append(name)
            return x
        if isinstance(m, _PASS_MODULES) and not any(True for _ in m.parameters()):
            return x
        raise ValueError(f"slimmify: {who} cannot be sliced (supported: Conv2d incl. depthwise, Linear, "
                         "BatchNorm2d/1d and parameter-free activations, pooling, dropout, flatten)")


def _copy_prefix(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst[tuple(slice(0, s) for s in src.shape)].copy_(src)


def slimmify(model: nn.Module, max_width: float = 1.0, divisor: int = 1) -> SlimGraphModule:
    """A slimmable / ParaDiS copy of ``model`` (the model itself is not changed).

    Args:
        model: built from ``nn.Conv2d`` (groups 1 or depthwise), ``nn.Linear``,
            ``nn.BatchNorm2d``/``BatchNorm1d`` and parameter-free modules/functions, with
            residual adds; symbolically traceable by ``torch.fx``.
        max_width: widest fraction the net will run (``>= 1``); sliced layers are widened to
            ``round(max_width * C)`` channels, the original weights fill the 1.0x prefix.
        divisor: channel boundaries are multiples of it (e.g. 8).

    Returns a ``SlimGraphModule`` (a ``SlimNet``): ``net.set_switch(sw)``, ``use_switch``,
    ``forward_switches``, ``slimkern.export``, ``slimkern.profile`` work on it. Under
    ``Switch([1.0])`` (the default when no switch is set) in eval mode it computes what
    ``model`` computes. ``net.width_groups`` lists the layers of each width group.

    Raises RuntimeError when the model cannot be traced, ValueError naming the module or
    node that cannot be sliced (grouped conv, LayerNorm, channel concat, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"slimmify expects an nn.Module, got {type(model).__name__}")
    if isinstance(max_width, bool) or not isinstance(max_width, (int, float)) or not max_width >= 1.0:
        raise ValueError(f"slimmify: max_width must be a number >= 1.0 (the model's own width is 1.0x), "
                         f"got {max_width!r}")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"slimmify: divisor must be a positive int, got {divisor!r}")
    from slimkern._branch import SlimTracer
    try:
        graph = SlimTracer().trace(model)
    except Exception as e:
        raise RuntimeError(f"slimmify: could not trace {type(model).__name__} with torch.fx "
                           f"({type(e).__name__}: {e}). The forward must be symbolically traceable: no Python "
                           "control flow on tensor values or shapes") from e
    an = _Analysis(model, graph)
    uf = an.uf
    image = {uf.find(e) for e in an.image}
    outs = {uf.find(e) for e in an.outputs}
    if image & outs:
        raise ValueError("slimmify: the model's output channels are tied to its input channels; nothing can be "
                         "sliced")
    names: dict[int, str] = {}
    for name in an.order:  # a group is named after the first layer producing it
        r = uf.find(an.layers[name][1])
        names.setdefault(r, name)

    work = copy.deepcopy(model)
    mods = dict(work.named_modules())
    groups: dict[str, list[str]] = {}
    kw = {"max_width": float(max_width), "divisor": divisor}
    for name in an.order:
        m = mods[name]
        who = f"layer {name!r} ({type(m).__name__})"
        ri, ro = (uf.find(e) for e in an.layers[name])
        if ri in outs:
            raise ValueError(f"slimmify: {who} reads the model's output channels; layers after the classifier "
                             "cannot be sliced")
        slice_in, slice_out = ri not in image, ro not in outs
        if ro in image:
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) or (isinstance(m, nn.Conv2d) and _is_depthwise(m)):
                continue  # works on the image channels, which are never sliced: stays as it is
            raise ValueError(f"slimmify: {who} writes channels that are tied to the image input; it cannot be "
                             "sliced")
        if not slice_out and not slice_in:
            continue  # reads the image, writes the output: nothing to slice
        gin = names.get(ri) if slice_in else None
        gout = names.get(ro) if slice_out else None
        fk = {"device": m.weight.device if getattr(m, "weight", None) is not None else None,
              "dtype": m.weight.dtype if getattr(m, "weight", None) is not None else None}
        if isinstance(m, nn.Conv2d):
            new = SlimConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, m.bias is not None, slice_in=slice_in, slice_out=slice_out,
                             in_group=gin, out_group=gout, **kw, **fk)
        elif isinstance(m, nn.Linear):
            new = SlimLinear(m.in_features, m.out_features, m.bias is not None, slice_in=slice_in,
                             slice_out=slice_out, in_group=gin, out_group=gout, **kw, **fk)
        else:
            cls = SwitchableBatchNorm2d if isinstance(m, nn.BatchNorm2d) else SlimBatchNorm1d
            new = cls(m.num_features, m.eps, m.momentum, m.affine, group=gout, **kw, **fk)
        with torch.no_grad():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _copy_prefix(new.weight, m.weight)
                if m.bias is not None:
                    _copy_prefix(new.bias, m.bias)
            else:
                if m.affine:
                    _copy_prefix(new.weight, m.weight)
                    _copy_prefix(new.bias, m.bias)
                row = new.register_switch(Switch([1.0]))
                new.running_mean[row, :m.num_features].copy_(m.running_mean)
                new.running_var[row, :m.num_features].copy_(m.running_var)
                # the model's own statistics are real statistics of the 1.0x net: never "untracked"
                new.num_batches_tracked[row] = max(int(m.num_batches_tracked), 1)
            for pn, p in new.named_parameters(recurse=False):
                p.requires_grad_(getattr(m, pn).requires_grad)
        _set_module(work, name, new)
        for g in {gin, gout} - {None}:
            groups.setdefault(g, [])
            if name not in groups[g]:
                groups[g].append(name)
    net = SlimGraphModule(work, graph, class_name=f"Slim{type(model).__name__}")
    net.width_groups = groups
    net.train(model.training)
    return net


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    setattr(owner, leaf, new)
