"""MobileNet-v2 (Sandler et al. 2018) for 32x32 inputs, as a slimmable / ParaDiS net.

Inverted residual blocks: 1x1 expand + BN + ReLU6, dw 3x3 + BN + ReLU6, 1x1 project + BN,
identity add when the shape allows. The stem and the second stage have stride 1 so CIFAR
images are not reduced too early (the CIFAR setting of the DAC paper). Blocks tied by an
identity add share one channel group.
"""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import Layers, scaled
from slimkern.nn import SlimNet

# (expansion t, out channels c, repeats n, first stride s)
CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, L: Layers, cin: int, cout: int, stride: int, expand: int, gin: str, gout: str, name: str):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        gh = gin
        if expand != 1:
            gh = f"{name}.hidden"
            layers += [L.conv(cin, hidden, 1, in_group=gin, out_group=gh), L.bn(hidden, gh, "relu6")]
        layers += [L.conv(hidden, hidden, 3, stride, 1, groups=hidden, in_group=gh, out_group=gh),
                   L.bn(hidden, gh, "relu6"), L.conv(hidden, cout, 1, in_group=gh, out_group=gout),
                   L.bn(cout, gout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(SlimNet):
    """Args: ``num_classes``, ``in_channels``, ``max_width``, ``width_mult``, ``last_channels``
    (1280 at 1.0x, scaled by ``width_mult`` here so small nets stay small), ``divisor``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0,
                 width_mult: float = 1.0, last_channels: int = 1280, divisor: int = 1):
        super().__init__()
        L = Layers(max_width, divisor)
        cin, g = scaled(32, width_mult), "stem"
        layers: list[nn.Module] = [L.conv(in_channels, cin, 3, 1, 1, slice_in=False, out_group=g),
                                   L.bn(cin, g, "relu6")]
        for si, (t, c, n, s) in enumerate(CFG):
            cout = scaled(c, width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                # a block with an identity add keeps its input's group: the add ties the two
                gout = g if (stride == 1 and cin == cout) else f"s{si + 1}"
                layers.append(InvertedResidual(L, cin, cout, stride, t, g, gout, f"s{si + 1}b{i + 1}"))
                cin, g = cout, gout
        last = scaled(last_channels, width_mult)
        layers += [L.conv(cin, last, 1, in_group=g, out_group="head"), L.bn(last, "head", "relu6")]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = L.classifier(last, num_classes, "head")
        self.num_features = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
