"""Small nets built from slimkern.nn layers, shared by the export/profile/slimmify tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkern.nn import SlimConv2d, SlimLinear, SlimNet, SwitchableBatchNorm2d


class TinyResNet(SlimNet):
    """stem conv (image input) -> BN -> ReLU -> [dense conv -> BN] + residual -> depthwise conv ->
    BN(relu) -> avgpool -> classifier (fused)."""

    def __init__(self, c=8, classes=10, max_width=1.0):
        super().__init__()
        mw = {"max_width": max_width}
        self.stem = SlimConv2d(3, c, 3, padding=1, bias=False, slice_in=False, **mw)
        self.bn0 = SwitchableBatchNorm2d(c, **mw)
        self.conv = SlimConv2d(c, c, 3, padding=1, bias=False, **mw)
        self.bn1 = SwitchableBatchNorm2d(c, **mw)
        self.dw = SlimConv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False, **mw)
        self.bn2 = SwitchableBatchNorm2d(c, activation="relu", **mw)
        self.fc = SlimLinear(c, classes, slice_out=False, **mw)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn1(self.conv(x))
        x = self.bn2(self.dw(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyConvBN(SlimNet):
    """conv3x3 (3 -> 8, image not sliced) -> BN(relu) -> spatial mean -> classifier 8 -> 4 (fused):
    the smallest net with every kind of slim layer a training recipe touches."""

    def __init__(self, max_width=1.5):
        super().__init__()
        kw = dict(max_width=max_width)
        self.c1 = SlimConv2d(3, 8, 3, 1, 1, bias=False, slice_in=False, **kw)
        self.b1 = SwitchableBatchNorm2d(8, activation="relu", **kw)
        self.fc = SlimLinear(8, 4, slice_out=False, **kw)

    def forward(self, x):
        return self.fc(self.b1(self.c1(x)).mean((2, 3)))


def train_stats(net, switches, steps=3, shape=(4, 3, 8, 8), seed=0):
    """A few training-mode passes per switch so every BN row holds real statistics."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for sw in switches:
            with net.use_switch(sw):
                for _ in range(steps):
                    net(torch.randn(shape, generator=g))
    return net.eval()
