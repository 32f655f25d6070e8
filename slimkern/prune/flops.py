"""DWNP's ``T(a)``: the MACs of a net as a differentiable function of its channel masks.

For masks ``a_g in [0, 1]^{C_g}`` per width group, the soft channel count is
``s_g = sum_c a_g,c`` (a group without a mask keeps ``C_g``; an unsliced side, the image or
the classes, its fixed count). Per layer, with the output size ``H_o x W_o`` of the unpruned
net at ``input_size`` (pruning channels does not change spatial sizes):

* dense conv ``k_h x k_w``:   ``N H_o W_o k_h k_w * s_in * s_out``
* depthwise conv:             ``N H_o W_o k_h k_w * s_g``
* linear:                     ``N_rows * s_in * s_out``
* BN, activations, pooling:   0

which are ``slimkern.profile``'s closed forms with channel counts replaced by soft counts: on
hard 0/1 masks ``T(a)`` equals ``profile(prune_channels(net, keep))``.macs exactly (tested).
DWNP (Gao et al., eq. 4) calls this the FLOPs; here FLOPs means MACs, the slimkern
convention -- the ratios ``T(a) / T_total`` that eq. 4 constrains are the same either way.
The mask of a device model is ``a^0 * a^n`` (elementwise): pass the product.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimkern.prune.cost import pruned_profile
from slimkern.prune.groups import as_slim_net, channel_groups
from slimkern.prune.keep import normalize_keep
from slimkern.nn.conv import SlimConv2d
from slimkern.nn.linear import SlimLinear

__all__ = ["FlopsModel"]


class FlopsModel:
    """``T(a)`` for one net and input size. ``flops(masks)`` -> scalar tensor; ``total`` is
    ``T`` of the unpruned net (``T_total``), ``minimum(groups)`` the MACs with every listed
    group at one channel (the smallest reachable model)."""

    def __init__(self, model: nn.Module, input_size=(1, 3, 32, 32)):
        net = as_slim_net(model, "FlopsModel")
        self.groups = channel_groups(net, "FlopsModel")
        prof = pruned_profile(net, {}, input_size)
        mods = dict(net.named_modules())
        # per layer: (name, factor, in group or None, fixed in count, out group or None, fixed out count);
        # MACs = factor * s_in * s_out. Parameter terms: (per-unit, group or None, fixed, ...) alike
        self.terms: list[tuple[str, int, str | None, int, str | None, int]] = []
        self.param_terms: list[tuple[int, str | None, int, str | None, int]] = []
        for lc in prof.branches[0].layers:
            m = mods[lc.name]
            if isinstance(m, SlimConv2d):
                n, cout, ho, wo = lc.output_shape
                k = math.prod(m.kernel_size)
                spatial = n * ho * wo * k
                go = m.out_group if m.slice_out else None
                if m.depthwise:
                    self.terms.append((lc.name, spatial, None, 1, go, m.out_full))
                    self.param_terms.append((k + (m.bias is not None), None, 1, go, m.out_full))
                else:
                    gi = m.in_group if m.slice_in else None
                    self.terms.append((lc.name, spatial, gi, m.in_full, go, m.out_full))
                    self.param_terms.append((k, gi, m.in_full, go, m.out_full))
                    if m.bias is not None:
                        self.param_terms.append((1, None, 1, go, m.out_full))
            elif isinstance(m, SlimLinear):
                rows = math.prod(lc.output_shape[:-1])
                gi, go = (m.in_group if m.slice_in else None), (m.out_group if m.slice_out else None)
                self.terms.append((lc.name, rows, gi, m.in_full, go, m.out_full))
                self.param_terms.append((1, gi, m.in_full, go, m.out_full))
                if m.bias is not None:  # a fused classifier's bias is profile's fusion_params: counted once
                    self.param_terms.append((1, None, 1, go, m.out_full))
            elif lc.macs:
                raise ValueError(f"FlopsModel: layer {lc.name!r} ({type(m).__name__}) has MACs but no soft closed form")
            elif lc.params:  # BN: 2 C (affine)
                g = getattr(m, "group", None)
                self.param_terms.append((lc.params // m.num_features, None, 1, g, m.num_features))
        self.total = int(prof.macs)
        self.total_params = int(prof.params)
        self.input_size = tuple(input_size)

    def _count(self, masks, g, fixed):
        if g is None:
            return fixed
        if g in masks:
            return masks[g].sum()
        return self.groups[g].channels

    def flops(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``T(a)`` (module docstring); ``masks`` ``{group: [C_g]}``, differentiable."""
        if not isinstance(masks, dict):
            raise TypeError(f"FlopsModel.flops: masks must be a dict {{group: [C_g] tensor}}, got "
                            f"{type(masks).__name__}")
        ref = None
        for g, a in masks.items():
            if g not in self.groups:
                raise ValueError(f"FlopsModel.flops: unknown width group {g!r}")
            if not isinstance(a, torch.Tensor) or a.dim() != 1 or a.numel() != self.groups[g].channels:
                raise ValueError(f"FlopsModel.flops: the mask of group {g!r} must be a 1-D tensor of "
                                 f"{self.groups[g].channels} values")
            ref = a
        total = ref.new_zeros(()) if ref is not None else torch.zeros(())
        for _, factor, gi, ci, go, co in self.terms:
            total = total + factor * self._count(masks, gi, ci) * self._count(masks, go, co)
        return total

    def _check_masks(self, masks):
        return self.flops(masks)  # validates; cheap

    def params(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameters as a function of the masks (profile's closed forms on soft counts)."""
        self._check_masks(masks)
        total = torch.zeros(())
        for factor, gi, ci, go, co in self.param_terms:
            total = total + factor * self._count(masks, gi, ci) * self._count(masks, go, co)
        return total

    def layer_macs(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        """MACs per conv / linear layer under ``masks`` (floats)."""
        return {name: float(f * self._count(masks, gi, ci) * self._count(masks, go, co))
                for name, f, gi, ci, go, co in self.terms}

    def hard_cost(self, keep: dict) -> tuple[int, int]:
        """``(MACs, params)`` of keeping ``keep[g]`` channels (index lists) per group."""
        keep = normalize_keep(keep, self.groups, "FlopsModel.hard_cost")
        masks = {}
        for g, k in keep.items():
            m = torch.zeros(self.groups[g].channels)
            m[k] = 1
            masks[g] = m
        return int(round(float(self.flops(masks)))), int(round(float(self.params(masks))))

    def minimum(self, groups) -> int:
        """MACs with each group in ``groups`` kept at one channel (others whole)."""
        ones = {g: torch.zeros(self.groups[g].channels) for g in groups}
        for v in ones.values():
            v[0] = 1
        return int(round(float(self.flops(ones))))
