"""MobileNet-v1 (Howard et al. 2017) in its CIFAR form: 3x3 stem with stride 1, so a
32x32 input reaches 2x2 before the pool (the variant the ParaDiS and US-Nets CIFAR
experiments use). Depthwise-separable blocks: dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU."""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import scaled

# (out_channels, stride) after the 32-channel stem; ImageNet's first stride-2 stage is stride 1 here.
CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 stem_stride: int = 1):
        super().__init__()
        c0 = scaled(32, width_mult)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c0, 3, stem_stride, 1, bias=False),
                                   nn.BatchNorm2d(c0), nn.ReLU(inplace=True)]
        cin = c0
        for c, s in CFG:
            cout = scaled(c, width_mult)
            layers += [nn.Conv2d(cin, cin, 3, s, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                       nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
