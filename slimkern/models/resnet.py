"""CIFAR ResNets (He et al. 2016) as slimmable / ParaDiS nets: ``resnet20`` (3 stages of
16/32/64 channels, 3 basic blocks each) and a ``resnet18``-style net (4 stages of 64..512,
[2,2,2,2] blocks, 3x3 stem with stride 1). Downsampling shortcuts are 1x1 conv + BN
("option B"): option A's zero-padding shortcut would mix channel ranges, which a ParaDiS
branch must not do. All outputs of a stage (tied by the residual adds) share one group."""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import Layers, scaled
from slimkern.nn import SlimNet


class BasicBlock(nn.Module):
    def __init__(self, L: Layers, cin: int, cout: int, stride: int, gin: str, gout: str, name: str):
        super().__init__()
        gmid = f"{name}.mid"
        self.conv1 = L.conv(cin, cout, 3, stride, 1, in_group=gin, out_group=gmid)
        self.bn1 = L.bn(cout, gmid, "relu")
        self.conv2 = L.conv(cout, cout, 3, 1, 1, in_group=gmid, out_group=gout)
        self.bn2 = L.bn(cout, gout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(L.conv(cin, cout, 1, stride, in_group=gin, out_group=gout), L.bn(cout, gout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.relu(out + self.shortcut(x))


class CifarResNet(SlimNet):
    def __init__(self, stage_channels: list[int], blocks: list[int], num_classes: int = 10, in_channels: int = 3,
                 max_width: float = 1.0, width_mult: float = 1.0, divisor: int = 1):
        super().__init__()
        L = Layers(max_width, divisor)
        chans = [scaled(c, width_mult) for c in stage_channels]
        self.stem = nn.Sequential(L.conv(in_channels, chans[0], 3, 1, 1, slice_in=False, out_group="s1"),
                                  L.bn(chans[0], "s1", "relu"))
        layers: list[nn.Module] = []
        cin, g = chans[0], "s1"
        for i, (c, n) in enumerate(zip(chans, blocks)):
            for j in range(n):
                gout = f"s{i + 1}"
                layers.append(BasicBlock(L, cin, c, 2 if (i > 0 and j == 0) else 1, g, gout, f"s{i + 1}b{j + 1}"))
                cin, g = c, gout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = L.classifier(cin, num_classes, g)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
             divisor: int = 1) -> CifarResNet:
    return CifarResNet([16, 32, 64], [3, 3, 3], num_classes, in_channels, max_width, width_mult, divisor)


def resnet18(num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
             divisor: int = 1) -> CifarResNet:
    return CifarResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_channels, max_width, width_mult, divisor)
