"""Cost of a pruned net without building it: ``profile`` at the per-layer switch of the kept counts.

MACs, parameters and activation sizes depend on how many channels each group keeps, not on
which: ``profile(net, Switch.from_channels({g: |K_g|}))`` runs the closed forms of
``slimkern.profile`` on the masked net's shapes and equals ``profile(prune_channels(net, K))``.
"""
from __future__ import annotations

import torch.nn as nn

from slimkern.profile import Profile, profile
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.prune.keep import keep_switch, normalize_keep
from slimkern.switch import Switch

__all__ = ["pruned_profile"]


def pruned_profile(model: nn.Module, keep, input_size=(1, 3, 32, 32)) -> Profile:
    """``slimkern.profile`` of ``model`` with only ``keep``'s channels (see ``prune_channels``
    for ``keep``); nothing is copied and no data is read (shapes on the meta device).

    The per-layer switch names groups, so their names must be identifiers (``slimkern.models``
    names are; ``slimmify`` of an ``nn.Sequential`` names groups "0", "1", ...: profile
    ``prune_channels(model, keep)`` instead)."""
    net = as_slim_net(model, "pruned_profile")
    groups = channel_groups(net, "pruned_profile")
    keep = normalize_keep(keep, groups, "pruned_profile")
    was = net.training
    net.eval()  # shapes only; eval keeps BN from refusing 1x1 maps at batch 1 on the meta pass
    try:
        if all(len(k) == groups[g].channels for g, k in keep.items()):
            return profile(net, Switch([1.0]), input_size=input_size)  # nothing pruned: any group names work
        return profile(net, keep_switch(keep), input_size=input_size)
    finally:
        net.train(was)
