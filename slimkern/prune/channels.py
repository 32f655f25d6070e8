"""``prune_channels``: kept channel indices -> a physically smaller plain torch model.

For kept sets ``K_g`` per width group (``slimkern.prune.groups``), every layer of the base
(``[1.0]x``) net becomes a plain torch layer on the kept channels (DHP-style index_select of
weights and BN statistics; Li et al. "Pruning Filters for Efficient ConvNets" for the idea):

* conv ``W[c_out, c_in, kh, kw]`` -> ``W[K_out][:, K_in]`` (bias ``b[K_out]``); a depthwise conv
  keeps filters ``K_g`` and becomes ``groups = |K_g|``;
* linear ``W[K_out][:, K_in]``; a classifier keeps all outputs and its bias;
* BN: ``gamma[K], beta[K]``, running mean / var ``[K]`` of the ``[1.0]x`` statistics row;
* sides that are never sliced (the image input, the class outputs) are kept whole.

Layers tied by a residual add share a group, hence one index set, so the adds still line up.
The result computes exactly what the net computes with the removed channels masked to zero
(``slimkern.prune.apply_masks`` with the 0/1 masks of ``K``): a removed channel of a group
contributes nothing to any reader. It is a ``torch.fx.GraphModule`` of standard layers (no
slimkern code): it runs under ``torch.export.export``, saves with ``state_dict`` and loads
with ``torch.load(..., weights_only=True)``; ``slimkern.profile`` measures it directly.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from slimkern._branch import BranchGraph, is_fused, with_activation
from slimkern.nn._base import SlimModule
from slimkern.nn.batchnorm import SlimBatchNorm1d, SwitchableBatchNorm2d, _SwitchableBatchNorm
from slimkern.nn.conv import SlimConv2d
from slimkern.nn.linear import SlimLinear
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.prune.keep import normalize_keep
from slimkern.switch import Switch

__all__ = ["prune_channels"]

_BASE = Switch([1.0])


def _side(m, sliced: bool, group: str | None, full: int, keep: dict[str, torch.Tensor], device) -> torch.Tensor:
    return (keep[group] if sliced else torch.arange(full)).to(device)


def _pruned_layer(m: nn.Module, keep: dict[str, torch.Tensor], name: str) -> nn.Module:
    ref = next(iter(m.parameters()), None)
    if ref is None:
        ref = next(iter(m.buffers()))
    dev, fk = ref.device, {"device": ref.device, "dtype": ref.dtype}
    with torch.no_grad():
        if isinstance(m, SlimConv2d):
            o = _side(m, m.slice_out, m.out_group, m.out_full, keep, dev)
            bias = m.bias is not None
            if m.depthwise:
                k = o.numel()
                p = nn.Conv2d(k, k, m.kernel_size, m.stride, m.padding, m.dilation, groups=k, bias=bias, **fk)
                p.weight.copy_(m.weight.index_select(0, o))
            else:
                i = _side(m, m.slice_in, m.in_group, m.in_full, keep, dev)
                p = nn.Conv2d(i.numel(), o.numel(), m.kernel_size, m.stride, m.padding, m.dilation, bias=bias, **fk)
                p.weight.copy_(m.weight.index_select(0, o).index_select(1, i))
            if bias:
                p.bias.copy_(m.bias.index_select(0, o))
            return p
        if isinstance(m, SlimLinear):
            o = _side(m, m.slice_out, m.out_group, m.out_full, keep, dev)
            i = _side(m, m.slice_in, m.in_group, m.in_full, keep, dev)
            p = nn.Linear(i.numel(), o.numel(), bias=m.bias is not None, **fk)
            p.weight.copy_(m.weight.index_select(0, o).index_select(1, i))
            if m.bias is not None:
                p.bias.copy_(m.bias.index_select(0, o))
            return p
        if isinstance(m, (SwitchableBatchNorm2d, SlimBatchNorm1d)):
            row = m.switch_row(_BASE)
            if row is None:
                raise ValueError(f"prune_channels: layer {name!r} ({type(m).__name__}) has no BN statistics for "
                                 f"the base width {_BASE}: train the net at [1.0]x or run "
                                 "slimkern.calibrate_bn(net, loader, [Switch([1.0])]) first")
            k = keep[m.group].to(dev)
            cls = nn.BatchNorm2d if isinstance(m, SwitchableBatchNorm2d) else nn.BatchNorm1d
            p = cls(k.numel(), eps=m.eps, momentum=m.momentum, affine=m.affine, **fk)
            if m.affine:
                p.weight.copy_(m.weight.index_select(0, k))
                p.bias.copy_(m.bias.index_select(0, k))
            p.running_mean.copy_(m.running_mean[row].index_select(0, k))
            p.running_var.copy_(m.running_var[row].index_select(0, k))
            p.num_batches_tracked.copy_(m.num_batches_tracked[row])
            return with_activation(p, m.activation)
    raise TypeError(f"prune_channels: layer {name!r}: no plain equivalent is known for {type(m).__name__}")


def prune_channels(model: nn.Module, keep) -> fx.GraphModule:
    """A physically smaller plain copy of ``model`` keeping channels ``keep`` of each width group.

    Args:
        model: a net of slimkern layers (``slimkern.models``, ``slimkern.slimmify`` output) or a
            plain torch model (then ``slimmify`` finds its width groups first). Its base width
            ``[1.0]x`` is pruned, with the ``[1.0]x`` BN statistics.
        keep: ``{group name: kept channels}`` (ints in ``[0, C_g)``, an int tensor, or a bool mask
            of length ``C_g``); groups not named keep everything. ``channel_groups(net)`` lists the
            groups; residual-tied layers share one group, hence one index set.

    Returns a ``torch.fx.GraphModule`` of ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm`` (BN with a
    fused activation becomes ``Sequential(BN, ReLU[6])``) in ``model``'s train/eval mode, whose
    outputs equal ``model``'s at ``[1.0]x`` with the removed channels masked to zero
    (``apply_masks``). ``model`` is not changed.

    Raises TypeError/ValueError for a bad ``keep`` (unknown group, index out of range,
    duplicate, empty group) and ValueError when a BN has no ``[1.0]x`` statistics.
    """
    net = as_slim_net(model, "prune_channels")
    groups = channel_groups(net, "prune_channels")
    keep = normalize_keep(keep, groups, "prune_channels")
    bg = BranchGraph(net, "prune_channels")
    bg.check_fusion(_BASE, "prune_channels")
    g = fx.Graph()
    g.output(g.graph_copy(bg.graph, {}))
    root: dict[str, object] = {}
    for n in g.nodes:
        if n.op == "call_module" and n.target not in root:
            m = bg.modules[n.target]
            if isinstance(m, SlimModule):
                if not isinstance(m, (SlimConv2d, SlimLinear, _SwitchableBatchNorm)):
                    raise TypeError(f"prune_channels: layer {n.target!r}: no plain equivalent is known for "
                                    f"{type(m).__name__}")
                root[n.target] = _pruned_layer(m, keep, n.target)
            else:
                root[n.target] = copy.deepcopy(m)
        elif n.op == "get_attr":
            t = net
            for part in n.target.split("."):
                t = getattr(t, part)
            root[n.target] = t.detach().clone() if isinstance(t, torch.Tensor) else t
    assert not any(is_fused(m) for m in root.values() if isinstance(m, nn.Module))
    gm = fx.GraphModule(root, g, class_name=f"Pruned{type(model).__name__}")
    gm.train(model.training)
    return gm
