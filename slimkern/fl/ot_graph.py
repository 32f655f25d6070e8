"""Which layers of a model share a neuron basis: the layer table OT fusion aligns on.

OT fusion (``slimkern.fl.ot_fusion``) permutes / couples the neurons of every *width group*
-- the channels carried by one tensor space, e.g. a residual stream and every conv, BN and
identity add that reads or writes it. Two sources:

* a net built from slimkern layers (``slimkern.models``, ``slimkern.fl.models``): every slim
  layer names its groups (``in_group`` / ``out_group`` / BN ``group``); a side that is not
  sliced (the image input, the class output) is fixed;
* a plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm`` model: the union-find over its
  ``torch.fx`` graph that ``slimkern.slimmify`` uses (``slimkern.slimmify._Analysis``);
  residual adds tie their operands, depthwise convs and BN keep their input's group, the
  groups of the image input and of the outputs are fixed.

A fixed side must have the same size in every model and is never permuted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["Layer", "layer_table", "FIXED_IN", "FIXED_OUT"]

FIXED_IN = None  # the image input's channels (never permuted)
FIXED_OUT = None  # the class output's channels (never permuted)


@dataclass(frozen=True)
class Layer:
    """One parameterised layer: ``kind`` is ``"conv"``, ``"dwconv"`` (depthwise: in and out
    are one group), ``"linear"`` or ``"bn"``; ``in_group`` / ``out_group`` name its width
    groups (None: a fixed side); ``slim_bn``: running statistics are ``[S, C]`` switch rows."""
    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    slim_bn: bool = False


def _slim_table(model: nn.Module) -> list[Layer]:
    from slimkern.nn._base import SlimModule
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    from slimkern.nn.conv import SlimConv2d
    from slimkern.nn.linear import SlimLinear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            raise ValueError(f"ot_fuse: layer {name!r} is a plain {type(m).__name__} inside a slimkern net; "
                             "mix of plain and slim layers is not supported (slimmify the whole model)")
        if not isinstance(m, SlimModule):
            continue
        if isinstance(m, _SwitchableBatchNorm):
            if m.group is None:
                raise ValueError(f"ot_fuse: BN layer {name!r} has no width group name, so the layers sharing its "
                                 "channels are unknown (build it with group=...)")
            out.append(Layer(name, "bn", m.group, m.group, True))
            continue
        if not isinstance(m, (SlimConv2d, SlimLinear)):
            raise ValueError(f"ot_fuse: slim layer {name!r} ({type(m).__name__}) is not supported")
        gin = m.in_group if m.slice_in else FIXED_IN
        gout = m.out_group if m.slice_out else FIXED_OUT
        for side, sliced, g in (("input", m.slice_in, gin), ("output", m.slice_out, gout)):
            if sliced and g is None:
                raise ValueError(f"ot_fuse: layer {name!r} slices its {side} channels but names no width group, "
                                 "so the layers sharing them are unknown (build it with in_group/out_group)")
        kind = "dwconv" if isinstance(m, SlimConv2d) and m.depthwise else (
            "conv" if isinstance(m, SlimConv2d) else "linear")
        out.append(Layer(name, kind, gin, gout))
    return out


def _plain_table(model: nn.Module) -> list[Layer]:
    from slimkern._branch import trace
    from slimkern.slimmify import _Analysis, _is_depthwise

    an = _Analysis(model, trace(model, "ot_fuse"))
    uf = an.uf
    fixed = {uf.find(e) for e in an.image} | {uf.find(e) for e in an.outputs}
    names: dict[int, str] = {}
    for name in an.order:
        names.setdefault(uf.find(an.layers[name][1]), name)

    def group(e):
        r = uf.find(e)
        return None if r in fixed else names[r]

    mods = dict(model.named_modules())
    out = []
    for name in an.order:
        m = mods[name]
        gi, go = (group(e) for e in an.layers[name])
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(Layer(name, "bn", go, go))
        elif isinstance(m, nn.Conv2d):
            out.append(Layer(name, "dwconv" if _is_depthwise(m) else "conv", gi, go))
        else:
            out.append(Layer(name, "linear", gi, go))
    return out


def layer_table(model: nn.Module) -> list[Layer]:
    """The parameterised layers of ``model`` in forward order with their width groups.

    Raises ValueError when a layer cannot be placed (unknown layer type, a sliced side
    without a group name, a non-depthwise grouped conv, channel concatenation) and
    RuntimeError when a plain model cannot be traced by ``torch.fx``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ot_fuse: models must be nn.Modules, got {type(model).__name__}")
    from slimkern.nn._base import SlimModule

    if any(isinstance(m, SlimModule) for m in model.modules()):
        table = _slim_table(model)
    else:
        table = _plain_table(model)
    if not table:
        raise ValueError(f"ot_fuse: {type(model).__name__} has no Conv2d / Linear / BatchNorm layers to align")
    return table
