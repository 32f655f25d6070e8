"""Kept channel indices per width group: validation and the equivalent per-layer switch.

``keep`` maps a group name to the channels it keeps, given as a sequence of ints, a 1-D
integer tensor (indices in ``[0, C_g)``) or a 1-D bool tensor of length ``C_g`` (a hard mask).
Groups not named keep all their channels. Indices are used sorted (the pruned layer keeps
the original channel order), so ``keep`` and its sorted form prune alike.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from slimkern.prune.groups import Group
from slimkern.switch import Switch

__all__ = ["normalize_keep", "keep_counts", "keep_switch", "keep_masks"]


def normalize_keep(keep, groups: dict[str, Group], what: str = "prune_channels") -> dict[str, torch.Tensor]:
    """``{group: sorted int64 indices}`` for every group of the net (unnamed groups keep all).

    Raises TypeError/ValueError for a non-mapping, an unknown group, a non-integer or
    out-of-range index, duplicates, a bool mask of the wrong length or an empty group."""
    if not isinstance(keep, Mapping):
        raise TypeError(f"{what}: keep must be a mapping {{group name: kept channel indices}}, got "
                        f"{type(keep).__name__}")
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(f"{what}: unknown width group(s) {unknown}; the net's groups are {list(groups)}")
    out: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        if name not in keep:
            out[name] = torch.arange(g.channels)
            continue
        v = keep[name]
        if isinstance(v, torch.Tensor):
            if v.dim() != 1:
                raise ValueError(f"{what}: group {name!r}: kept channels must be 1-D, got shape {tuple(v.shape)}")
            if v.dtype == torch.bool:
                if v.numel() != g.channels:
                    raise ValueError(f"{what}: group {name!r}: a bool mask needs {g.channels} entries, got "
                                     f"{v.numel()}")
                idx = torch.nonzero(v.cpu()).flatten()
            elif v.dtype.is_floating_point or v.dtype.is_complex:
                raise TypeError(f"{what}: group {name!r}: kept channels must be integer indices or a bool mask, "
                                f"got a {v.dtype} tensor")
            else:
                idx = v.detach().cpu().to(torch.int64)
        else:
            try:
                items = list(v)
            except TypeError:
                raise TypeError(f"{what}: group {name!r}: kept channels must be a sequence of ints, got "
                                f"{type(v).__name__}") from None
            if any(isinstance(i, bool) or not isinstance(i, int) for i in items):
                raise TypeError(f"{what}: group {name!r}: kept channels must be ints, got {items!r}")
            idx = torch.tensor(items, dtype=torch.int64)
        if idx.numel() == 0:
            raise ValueError(f"{what}: group {name!r} would keep no channel; every group needs at least one")
        if int(idx.min()) < 0 or int(idx.max()) >= g.channels:
            raise ValueError(f"{what}: group {name!r} has {g.channels} channels; kept indices must be in "
                             f"[0, {g.channels}), got min {int(idx.min())}, max {int(idx.max())}")
        idx = torch.sort(idx).values
        if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
            raise ValueError(f"{what}: group {name!r} lists a kept channel twice")
        out[name] = idx
    return out


def keep_counts(keep: dict[str, torch.Tensor]) -> dict[str, int]:
    return {g: int(v.numel()) for g, v in keep.items()}


def keep_switch(keep: dict[str, torch.Tensor]) -> Switch:
    """The per-layer switch with the same channel counts: costs (MACs, params, activation
    sizes) depend on the counts only, so ``profile(net, keep_switch(k))`` is the masked net's
    cost, equal to the pruned net's."""
    return Switch.from_channels(keep_counts(keep))


def keep_masks(keep: dict[str, torch.Tensor], groups: dict[str, Group], dtype=torch.float32,
               device=None) -> dict[str, torch.Tensor]:
    """Hard 0/1 masks ``{group: [C_g]}`` with ones at the kept indices."""
    out = {}
    for name, g in groups.items():
        m = torch.zeros(g.channels, dtype=dtype, device=device)
        m[keep[name].to(m.device)] = 1
        out[name] = m
    return out
