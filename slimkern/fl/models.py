"""A small slimmable / ParaDiS CNN for federated simulations on small images (digits 8x8).

Three 3x3 conv + switchable BN + ReLU stages, global average pooling and the fused
classifier; every hidden layer is sliced (the image input and class output are not), so
``[1.0]``, ``[0.5]``, ``[0.5, 0.5]`` and rolling windows all run on it. Small enough that
a 20-client simulation takes seconds per round on a laptop CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from slimkern.nn import SlimConv2d, SlimLinear, SlimNet, SwitchableBatchNorm2d

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(SlimNet):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels=(32, 64, 64),
                 max_width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, c in enumerate(channels):
            g = f"c{i + 1}"
            layers.append(SlimConv2d(cin, c, 3, 2 if i == 1 else 1, 1, bias=False, max_width=max_width,
                                     slice_in=i > 0, in_group=None if i == 0 else f"c{i}", out_group=g))
            layers.append(SwitchableBatchNorm2d(c, max_width=max_width, group=g, activation="relu"))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimLinear(cin, num_classes, max_width=max_width, slice_out=False,
                                     in_group=f"c{len(channels)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def small_cnn(num_classes: int = 10, in_channels: int = 1, channels=(32, 64, 64), max_width: float = 1.0,
              seed: int | None = None) -> SmallCNN:
    """``SmallCNN`` with weights drawn from ``torch.Generator`` seeded by ``seed`` (if given)."""
    if seed is None:
        return SmallCNN(num_classes, in_channels, channels, max_width)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return SmallCNN(num_classes, in_channels, channels, max_width)
    finally:
        torch.random.set_rng_state(state)
