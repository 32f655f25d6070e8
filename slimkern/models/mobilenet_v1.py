"""MobileNet-v1 (Howard et al. 2017) in its CIFAR form, as a slimmable / ParaDiS net.

The 3x3 stem has stride 1, so a 32x32 input reaches 2x2 before the pool (the variant the
ParaDiS and US-Nets CIFAR experiments use). Depthwise-separable blocks: dw 3x3 + BN + ReLU,
pw 1x1 + BN + ReLU (BN and ReLU fused in ``SwitchableBatchNorm2d(activation="relu")``).
"""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import Layers, scaled
from slimkern.nn import SlimNet

# (out_channels, stride) after the 32-channel stem; ImageNet's first stride-2 stage is stride 1 here.
CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(SlimNet):
    """Args: ``num_classes``, ``in_channels``, ``max_width`` (e.g. 1.2 for the ParaDiS wide
    teacher), ``width_mult`` (scales the 1.0x channel counts: 0.25 gives 8..256 channels),
    ``stem_stride`` (1 for 32x32 inputs, 2 for ImageNet-size), ``divisor``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0,
                 width_mult: float = 1.0, stem_stride: int = 1, divisor: int = 1):
        super().__init__()
        L = Layers(max_width, divisor)
        c0 = scaled(32, width_mult)
        layers: list[nn.Module] = [L.conv(in_channels, c0, 3, stem_stride, 1, slice_in=False, out_group="stem"),
                                   L.bn(c0, "stem", "relu")]
        cin, g = c0, "stem"
        for i, (c, s) in enumerate(CFG):
            cout, gout = scaled(c, width_mult), f"b{i + 1}"
            layers += [L.conv(cin, cin, 3, s, 1, groups=cin, in_group=g, out_group=g), L.bn(cin, g, "relu"),
                       L.conv(cin, cout, 1, in_group=g, out_group=gout), L.bn(cout, gout, "relu")]
            cin, g = cout, gout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = L.classifier(cin, num_classes, g)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
