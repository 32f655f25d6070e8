"""A tiny chain net for the slimkern.nas tests (3 width groups, brute-forceable)."""
import torch

from slimkern.nn import SlimConv2d, SlimLinear, SlimNet, SwitchableBatchNorm2d


class TinyChain(SlimNet):
    """stem 3->8 (group a) -> conv 8->8 stride 2 (b) -> dw (b) -> 1x1 8->16 (c) -> pool -> fc."""

    def __init__(self, classes=10, in_channels=3, max_width=1.0):
        super().__init__()
        mw = {"max_width": max_width}
        self.stem = SlimConv2d(in_channels, 8, 3, padding=1, bias=False, slice_in=False, out_group="a", **mw)
        self.bn0 = SwitchableBatchNorm2d(8, group="a", activation="relu", **mw)
        self.conv1 = SlimConv2d(8, 8, 3, stride=2, padding=1, bias=False, in_group="a", out_group="b", **mw)
        self.bn1 = SwitchableBatchNorm2d(8, group="b", activation="relu", **mw)
        self.dw = SlimConv2d(8, 8, 3, padding=1, groups=8, bias=False, in_group="b", out_group="b", **mw)
        self.bn2 = SwitchableBatchNorm2d(8, group="b", activation="relu", **mw)
        self.conv2 = SlimConv2d(8, 16, 1, bias=False, in_group="b", out_group="c", **mw)
        self.bn3 = SwitchableBatchNorm2d(16, group="c", activation="relu", **mw)
        self.fc = SlimLinear(16, classes, slice_out=False, in_group="c", **mw)

    def forward(self, x):
        x = self.bn1(self.conv1(self.bn0(self.stem(x))))
        x = self.bn3(self.conv2(self.bn2(self.dw(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))
