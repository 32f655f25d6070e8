"""CIFAR ResNets (He et al. 2016): resnet20 (3 stages of 16/32/64 channels, 3 basic blocks
each) and a resnet18-style net (4 stages of 64..512, [2,2,2,2] blocks, 3x3 stem with stride
1). Downsampling shortcuts are 1x1 conv + BN ("option B"): the zero-padding shortcut of
"option A" would mix channel ranges, which a ParaDiS branch must not do."""
from __future__ import annotations

import torch
from torch import nn

from slimkern.models._common import scaled


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, stage_channels: list[int], blocks: list[int], num_classes: int = 10,
                 in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        chans = [scaled(c, width_mult) for c in stage_channels]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[0]),
                                  nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = chans[0]
        for i, (c, n) in enumerate(zip(chans, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))
