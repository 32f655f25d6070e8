"""Channel masks on a slim net's width groups (the *masked* model that pruning must equal).

A mask ``m_g`` of group ``g`` (a ``[C_g]`` tensor) multiplies, per channel, the output of
every mask point of the group (``slimkern.prune.groups``): ``y = act(bn(x)) * m_g``, i.e.
DWNP's eq. 3 (Gao et al., "Device-Wise Federated Network Pruning": masks on feature maps after
normalisation and activation). With a hard 0/1 mask, a channel with ``m = 0`` is zero wherever
the group's tensor is read -- after residual adds too, since every addend is masked -- so the
masked net computes exactly what ``prune_channels`` with the kept set ``{c : m_c = 1}``
computes. Soft masks in ``[0, 1]`` are applied once per mask point (differentiable: gradients
flow into the masks, which is how the DWNP hypernetwork learns).

The net runs its base width ``Switch([1.0])`` (one switch, ``[N, C_g, ...]`` tensors).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from slimkern.prune.groups import Group, channel_groups

__all__ = ["apply_masks"]


def _check_masks(masks, groups: dict[str, Group], what: str) -> None:
    if not isinstance(masks, dict):
        raise TypeError(f"{what}: masks must be a dict {{group name: [C_g] tensor}}, got {type(masks).__name__}")
    for name, m in masks.items():
        if name not in groups:
            raise ValueError(f"{what}: unknown width group {name!r}; the net's groups are {list(groups)}")
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.numel() != groups[name].channels:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{what}: the mask of group {name!r} must be a 1-D tensor of {groups[name].channels} "
                             f"values, got {shape}")


@contextlib.contextmanager
def apply_masks(net: nn.Module, masks: dict[str, torch.Tensor], groups: dict[str, Group] | None = None):
    """Within the block, ``net``'s forward multiplies each masked group's tensors by its mask.

    ``masks``: ``{group: [C_g] tensor}`` (groups not named are unmasked); the tensors are read
    at each forward, so they may be updated in place or carry gradients. Hooks are removed on
    exit, also on error.
    """
    groups = channel_groups(net, "apply_masks") if groups is None else groups
    _check_masks(masks, groups, "apply_masks")
    mods = dict(net.named_modules())
    handles = []

    def hook_for(name: str, gname: str):
        def hook(mod, inp, out):
            m = masks[gname]
            if out.shape[1] != m.numel():
                raise ValueError(f"apply_masks: layer {name!r} produced {out.shape[1]} channels but the mask of "
                                 f"group {gname!r} has {m.numel()}: masks apply to the base width [1.0]x only")
            return out * m.to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))
        return hook

    try:
        for gname in masks:
            for name in groups[gname].mask_points:
                handles.append(mods[name].register_forward_hook(hook_for(name, gname)))
        yield net
    finally:
        for h in handles:
            h.remove()
