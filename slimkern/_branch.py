"""One branch of a switch as a plain ``torch.fx`` graph module (shared by export and profile).

A slim net under switch ``sw`` is, for branch ``i``, the same dataflow graph in which every
slim layer reads and writes only its window ``layer.windows(sw)[i]``: a plain ``nn.Conv2d`` /
``nn.Linear`` / ``nn.BatchNorm2d`` on those channels. Parameter-free ops (activations,
pooling, residual adds, flatten) are unchanged. The *fused* layer (the classifier:
``slice_in`` and not ``slice_out``) becomes a plain layer without bias that computes the
branch's partial logits ``W[:, in_i] @ x_i``; ParaDiS fusion sums them and adds the bias once.

The fused layer may be followed by an *epilogue* that reads only its (summed) output and
values every branch shares (the image, unsliced layers): WDSR adds an image skip conv and
pixel-shuffles (Yu et al. 2020; ParaDiS Appendix D). The epilogue is not linear in general,
so it runs once, on the sum of the partial outputs plus the bias (:meth:`BranchGraph.fusion`):
``y = E(x, sum_i W[:, in_i] @ x_i + b)``, exact for any ``E``. Nothing after the fused layer
may read a branch's own channels (that would not be a function of the sum).

The net is traced with ``torch.fx`` (slim layers as leaves), so this works for any net made
of slimkern layers: ``slimmify`` outputs and hand-written models alike.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from slimkern.nn._base import ChannelMixin, SlimModule
from slimkern.nn.batchnorm import SlimBatchNorm1d, SwitchableBatchNorm2d, _SwitchableBatchNorm
from slimkern.nn.conv import SlimConv2d
from slimkern.nn.linear import SlimLinear
from slimkern.nn.weight_norm import SlimWNConv2d
from slimkern.switch import Switch


class SlimTracer(fx.Tracer):
    """fx tracer that keeps slimkern layers as leaf modules (their forward is data dependent)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SlimModule):
            return True
        return super().is_leaf_module(m, qualname)


def trace(net: nn.Module, what: str = "slimkern") -> fx.Graph:
    """``torch.fx`` graph of ``net`` with slim layers as leaves; a clear error if untraceable."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(net).__name__}")
    try:
        return SlimTracer().trace(net)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on control flow, ...)
        raise RuntimeError(f"{what}: could not trace {type(net).__name__} with torch.fx "
                           f"({type(e).__name__}: {e}). The forward must be symbolically traceable: no "
                           "Python control flow on tensor values or shapes") from e


def is_fused(m: nn.Module) -> bool:
    """A layer that sums its branches' partial outputs (a classifier): sliced in, not out."""
    return isinstance(m, ChannelMixin) and m.slice_in and not m.slice_out


def varies_by_branch(m: nn.Module) -> bool:
    """A slim layer whose output differs between the branches of a switch (it writes the
    branch's own channels): every sliced-out layer and every switchable BN. Unsliced layers
    and the fused layer (the full, summed output) do not."""
    return isinstance(m, SlimModule) and not (isinstance(m, ChannelMixin) and not m.slice_out)


def input_shape(input_size) -> tuple[int, ...]:
    """``input_size`` (batch included) as a tuple of positive ints, else a clear error."""
    try:
        input_size = tuple(int(s) for s in input_size)
    except TypeError:
        raise TypeError(f"input_size must be a sequence of ints like (1, 3, 32, 32), got {input_size!r}") from None
    if not input_size or any(s <= 0 for s in input_size):
        raise ValueError(f"input_size must be positive dims, got {input_size}")
    return input_size


def with_activation(bn: nn.Module, activation: str) -> nn.Module:
    """A plain BN followed by the activation a switchable BN fuses (``"none"``: the BN alone)."""
    if activation == "relu":
        return nn.Sequential(bn, nn.ReLU())
    if activation == "relu6":
        return nn.Sequential(bn, nn.ReLU6())
    return bn


def _bn_row(m: _SwitchableBatchNorm, sw: Switch, name: str) -> int:
    row = m.switch_row(sw)
    if row is None:
        raise ValueError(f"layer {name!r} ({type(m).__name__}) has no BN statistics for switch {sw}: train it "
                         "with that switch or run slimkern.calibrate_bn(net, loader, [sw]) before exporting")
    return row


def plain_layer(m: nn.Module, sw: Switch, i: int, name: str, meta: bool = False) -> nn.Module:
    """The plain torch layer that branch ``i`` of ``sw`` runs in place of slim layer ``m``.

    Weights are copied out (``meta=True``: shapes only, on the meta device, nothing copied).
    """
    ref = next(iter(m.parameters()), None)
    if ref is None:
        ref = next(iter(m.buffers()), torch.empty(0))
    fk = {"device": "meta" if meta else ref.device, "dtype": ref.dtype}
    try:
        if isinstance(m, SlimWNConv2d):
            # the weight norm is a constant of the trained weights: fold g v / ||v|| once
            wins = m.windows(sw)
            (i0, i1), (o0, o1) = wins[i]
            fused = is_fused(m)
            bias = m.bias is not None and not fused
            p = nn.Conv2d(i1 - i0, o1 - o0, m.kernel_size, m.stride, m.padding, m.dilation, bias=bias, **fk)
            if not meta:
                norm = [r for r, _ in wins] if fused else None  # fused: over every input the switch reads
                with torch.no_grad():
                    p.weight.copy_(m.effective_weight((i0, i1), (o0, o1), norm))
                    if bias:
                        p.bias.copy_(m.bias[o0:o1])
            return p
        if isinstance(m, SlimConv2d):
            (i0, i1), (o0, o1) = m.windows(sw)[i]
            fused = is_fused(m)
            cin, cout = i1 - i0, o1 - o0
            bias = m.bias is not None and not fused
            if m.depthwise:
                p = nn.Conv2d(cout, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups=cout, bias=bias, **fk)
                w = m.weight[o0:o1]
            else:
                p = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, bias=bias, **fk)
                w = m.weight[o0:o1, i0:i1]
            if not meta:
                with torch.no_grad():
                    p.weight.copy_(w)
                    if bias:
                        p.bias.copy_(m.bias[o0:o1])
            return p
        if isinstance(m, SlimLinear):
            (i0, i1), (o0, o1) = m.windows(sw)[i]
            bias = m.bias is not None and not is_fused(m)
            p = nn.Linear(i1 - i0, o1 - o0, bias=bias, **fk)
            if not meta:
                with torch.no_grad():
                    p.weight.copy_(m.weight[o0:o1, i0:i1])
                    if bias:
                        p.bias.copy_(m.bias[o0:o1])
            return p
        if isinstance(m, (SwitchableBatchNorm2d, SlimBatchNorm1d)):
            o0, o1 = m.out_ranges(sw)[i]
            cls = nn.BatchNorm2d if isinstance(m, SwitchableBatchNorm2d) else nn.BatchNorm1d
            p = cls(o1 - o0, eps=m.eps, momentum=m.momentum, affine=m.affine, **fk)
            if not meta:
                row = _bn_row(m, sw, name)
                with torch.no_grad():
                    if m.affine:
                        p.weight.copy_(m.weight[o0:o1])
                        p.bias.copy_(m.bias[o0:o1])
                    p.running_mean.copy_(m.running_mean[row, o0:o1])
                    p.running_var.copy_(m.running_var[row, o0:o1])
                    p.num_batches_tracked.copy_(m.num_batches_tracked[row])
            return with_activation(p, m.activation)
    except ValueError as e:
        prefix = f"layer {name!r} ({type(m).__name__})"
        raise ValueError(str(e) if str(e).startswith(prefix) else f"{prefix}: {e}") from None  # said once
    raise TypeError(f"layer {name!r}: no plain equivalent is known for {type(m).__name__} "
                    "(export/profile handle SlimConv2d, SlimWNConv2d, SlimLinear, SwitchableBatchNorm2d, "
                    "SlimBatchNorm1d)")


class BranchGraph:
    """The traced graph of a net plus what export/profile need to know about it."""

    def __init__(self, net: nn.Module, what: str):
        self.net = net
        self.graph = trace(net, what)
        self.modules = dict(net.named_modules())
        self.fused = [n for n in self.graph.nodes
                      if n.op == "call_module" and is_fused(self.modules[n.target])]
        self.slim = any(isinstance(self.modules[n.target], SlimModule)
                        for n in self.graph.nodes if n.op == "call_module")

    def check_fusion(self, sw: Switch, what: str, epilogue: bool = False) -> nn.Module | None:
        """The fused layer whose output is the net's output (None for an unsliced net).

        Summing the branches is only the net's output when the fused layer's result *is* the
        output: anything after it (an activation, a second layer) would not distribute over
        the sum. ``epilogue=True`` (export, profile) also accepts such an epilogue when it
        reads only the fused output and shared values: it then runs once on the sum
        (:meth:`fusion`).
        """
        if not self.fused:
            if self.slim and sw.num_branches > 1:
                raise ValueError(f"{what}: the net has no fused layer (a classifier SlimLinear/SlimConv2d with "
                                 "slice_out=False), so its branches cannot be summed")
            return None
        if len(self.fused) > 1:
            raise ValueError(f"{what}: the net has {len(self.fused)} fused layers "
                             f"({[n.target for n in self.fused]}); one classifier is supported")
        node = self.fused[0]
        if epilogue:
            self.epilogue(what)
            return self.modules[node.target]
        users = list(node.users)
        if not (len(users) == 1 and users[0].op == "output" and users[0].args[0] is node):
            raise ValueError(f"{what}: the fused layer {node.target!r} must produce the net's output directly "
                             f"(found users {[u.format_node() for u in users]}); ParaDiS fusion sums partial "
                             "outputs, which only equals the net when nothing follows the classifier")
        return self.modules[node.target]

    def _output(self) -> fx.Node:
        return next(n for n in self.graph.nodes if n.op == "output")

    def epilogue(self, what: str = "export") -> list[fx.Node]:
        """The nodes, in graph order, that the output needs besides the fused layer's branches:
        empty when the fused layer's output is the net's output. Raises ValueError when one of
        them reads a branch's own channels (a value that is not a function of the sum)."""
        if len(self.fused) != 1:
            return []
        node, out = self.fused[0], self._output()
        if out.args[0] is node:
            return []
        dep: set[fx.Node] = set()  # values that differ between the branches of a switch
        for n in self.graph.nodes:
            if n is not node and ((n.op == "call_module" and varies_by_branch(self.modules[n.target]))
                                  or any(a in dep for a in n.all_input_nodes)):
                dep.add(n)
        need: set[fx.Node] = set()  # what the output needs, stopping at the fused layer
        stack, reaches = [out], False
        while stack:
            for a in stack.pop().all_input_nodes:
                if a is node:
                    reaches = True
                elif a not in need:
                    need.add(a)
                    stack.append(a)
        if not reaches:
            raise ValueError(f"{what}: the net's output does not depend on its fused layer {node.target!r}")
        bad = [n for n in self.graph.nodes if n in need and n in dep]
        if bad:
            raise ValueError(f"{what}: after the fused layer {node.target!r}, the net reads {bad[0].format_node()}, "
                             "which depends on a branch's own channels; ParaDiS fusion sums the branches' partial "
                             "outputs, so what follows the fused layer may read only its output and values every "
                             "branch shares (the input, unsliced layers)")
        return [n for n in self.graph.nodes if n in need]

    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return seen

    def _subgraph(self, keep: set[fx.Node], result, fused_input: fx.Node | None = None) -> fx.Graph:
        """The nodes of ``keep`` (graph order) with every placeholder, returning ``result``;
        ``fused_input``: a node read from an extra last placeholder ``fused`` instead."""
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.graph.nodes:
            if n.op == "placeholder":
                env[n] = g.node_copy(n, env.__getitem__)
        if fused_input is not None:
            env[fused_input] = g.placeholder("fused")
        for n in self.graph.nodes:
            if n in keep and n.op not in ("placeholder", "output") and n not in env:
                env[n] = g.node_copy(n, env.__getitem__)
        g.output(fx.map_arg(result, env.__getitem__))
        return g

    def _module(self, g: fx.Graph, sw: Switch, i: int, meta: bool, class_name: str) -> fx.GraphModule:
        """``g`` with its modules made plain for branch ``i`` of ``sw`` (weights copied)."""
        root: dict[str, object] = {}
        for n in g.nodes:
            if n.op == "call_module":
                m = self.modules[n.target]
                if n.target in root:
                    continue
                if isinstance(m, SlimModule):
                    root[n.target] = plain_layer(m, sw, i, n.target, meta)
                else:
                    c = copy.deepcopy(m)
                    root[n.target] = c.to("meta") if meta else c
            elif n.op == "get_attr":
                t = _get_attr(self.net, n.target)
                if isinstance(t, torch.Tensor):
                    t = t.detach().to("meta") if meta else t.detach().clone()
                root[n.target] = t
        gm = fx.GraphModule(root, g, class_name=class_name)
        gm.train(self.net.training)
        return gm

    def branch(self, sw: Switch, i: int, meta: bool = False, class_name: str = "Branch") -> fx.GraphModule:
        """Branch ``i`` of ``sw`` as a ``GraphModule`` of plain torch layers: the net, or up to
        the fused layer's partial output when an epilogue follows it."""
        if self.epilogue():
            node = self.fused[0]
            g = self._subgraph(self._ancestors(node), node)
        else:
            g = fx.Graph()
            out = g.graph_copy(self.graph, {})
            g.output(out)
        return self._module(g, sw, i, meta, class_name)

    def fusion(self, sw: Switch, meta: bool = False, class_name: str = "Fusion") -> fx.GraphModule | None:
        """The epilogue as a ``GraphModule`` ``(x, fused) -> output`` of plain layers, where
        ``fused`` is the sum of the branches' partial outputs plus the fused bias; None when
        the fused layer's output is the net's output. Its slim layers are unsliced (checked),
        so they are the same for every branch."""
        nodes = self.epilogue()
        if not nodes:
            return None
        return self._module(self._subgraph(set(nodes), self._output().args[0], self.fused[0]), sw, 0, meta,
                            class_name)


def _get_attr(mod: nn.Module, target: str):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod
