"""Plain-PyTorch slimmable / ParaDiS training, written the way the slimmable_networks code
(Yu et al. 2019; US-Nets, Yu & Huang 2019) does it: ordinary ``nn.Conv2d`` / ``nn.Linear``
modules allocated at the widest width, a ``width_mult`` attribute set on every module before
a forward, weights sliced in ``forward``, batch-norm statistics in a per-width
``nn.ModuleList`` with the affine shared (``USBatchNorm2d``), and one forward + backward per
switch. A ParaDiS switch with several branches runs one forward per branch (each branch
is a sub-network on its own channel range) and sums the branches' partial logits, adding the
classifier bias once.

It is the baseline of ``benchmarks/bench_train_step.py`` and the independent reference of
``python_tests/test_packed.py`` (same losses and gradients as slimkern's packed pass). Its
parameter names match ``slimkern.models`` so ``load_from_slim`` copies the weights by name.
Nothing here imports slimkern: ``width_mult`` is a fraction range ``(f0, f1)`` of the base
width (``(0, w)`` for a plain width ``w``), turned into channels as ``floor(f * C + 1/2)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _round(f: float, c: int) -> int:
    return int(math.floor(f * c + 0.5 + 1e-9))


def _full(c: int, max_width: float) -> int:
    return max(c, _round(max_width, c))


def _range(width_mult, c: int, max_width: float) -> tuple[int, int]:
    f0, f1 = width_mult
    return _round(f0, c), min(_round(f1, c), _full(c, max_width))


class SConv2d(nn.Conv2d):
    """``nn.Conv2d`` at max width; ``forward`` slices ``weight[out, in]`` for ``width_mult``."""

    def __init__(self, cin, cout, k, stride=1, padding=0, depthwise=False, max_width=1.0, slice_in=True):
        fin = _full(cin, max_width) if slice_in else cin
        fout = _full(cout, max_width)
        super().__init__(fin, fout, k, stride, padding, groups=fout if depthwise else 1, bias=False)
        self.base_in, self.base_out, self.max_width = cin, cout, max_width
        self.slice_in, self.depthwise = slice_in, depthwise
        self.width_mult = (0.0, 1.0)

    def forward(self, x):
        o0, o1 = _range(self.width_mult, self.base_out, self.max_width)
        if self.depthwise:
            return F.conv2d(x, self.weight[o0:o1], None, self.stride, self.padding, 1, o1 - o0)
        i0, i1 = _range(self.width_mult, self.base_in, self.max_width) if self.slice_in else (0, self.base_in)
        return F.conv2d(x, self.weight[o0:o1, i0:i1], None, self.stride, self.padding)


class SBatchNorm2d(nn.Module):
    """US-Nets' ``USBatchNorm2d``: shared affine ``[C_full]``, running statistics per width in
    ``self.bn`` (a ModuleList of affine-free ``nn.BatchNorm2d``, one per switch), picked by
    ``bn_idx``; the slice ``[c0:c1]`` of the buffers is updated in place by ``F.batch_norm``."""

    def __init__(self, c, max_width=1.0, num_switches=1, relu=False):
        super().__init__()
        full = _full(c, max_width)
        self.base, self.max_width, self.relu = c, max_width, relu
        self.weight = nn.Parameter(torch.ones(full))
        self.bias = nn.Parameter(torch.zeros(full))
        self.bn = nn.ModuleList([nn.BatchNorm2d(full, affine=False) for _ in range(num_switches)])
        self.width_mult, self.bn_idx = (0.0, 1.0), 0

    def forward(self, x):
        c0, c1 = _range(self.width_mult, self.base, self.max_width)
        bn = self.bn[self.bn_idx]
        y = F.batch_norm(x, bn.running_mean[c0:c1], bn.running_var[c0:c1], self.weight[c0:c1], self.bias[c0:c1],
                         self.training, bn.momentum, bn.eps)
        return F.relu(y) if self.relu else y


class SLinear(nn.Linear):
    """Classifier: input sliced, output full; the bias is added only when ``with_bias`` (the
    first branch of a switch), so summing the branches' outputs adds it once."""

    def __init__(self, cin, num_classes, max_width=1.0):
        super().__init__(_full(cin, max_width), num_classes)
        self.base_in, self.max_width = cin, max_width
        self.width_mult, self.with_bias = (0.0, 1.0), True

    def forward(self, x):
        i0, i1 = _range(self.width_mult, self.base_in, self.max_width)
        return F.linear(x, self.weight[:, i0:i1], self.bias if self.with_bias else None)


def _scaled(c, width_mult):
    return max(1, int(round(c * width_mult)))


MBV1_CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
            (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class PlainMobileNetV1(nn.Module):
    """MobileNet-v1 for 32x32 (stride-1 stem), layer for layer as ``slimkern.models.MobileNetV1``."""

    def __init__(self, num_classes=10, max_width=1.0, width_mult=1.0, num_switches=1):
        super().__init__()
        c0 = _scaled(32, width_mult)
        kw = {"max_width": max_width}
        layers = [SConv2d(3, c0, 3, 1, 1, slice_in=False, **kw), SBatchNorm2d(c0, num_switches=num_switches,
                                                                              relu=True, **kw)]
        cin = c0
        for c, s in MBV1_CFG:
            cout = _scaled(c, width_mult)
            layers += [SConv2d(cin, cin, 3, s, 1, depthwise=True, **kw),
                       SBatchNorm2d(cin, num_switches=num_switches, relu=True, **kw),
                       SConv2d(cin, cout, 1, **kw), SBatchNorm2d(cout, num_switches=num_switches, relu=True, **kw)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SLinear(cin, num_classes, **kw)

    def forward(self, x):
        """Returns (logits of this branch, the classifier's input)."""
        f = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(f), f


class PlainBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, max_width, num_switches):
        super().__init__()
        kw = {"max_width": max_width}
        self.conv1 = SConv2d(cin, cout, 3, stride, 1, **kw)
        self.bn1 = SBatchNorm2d(cout, num_switches=num_switches, relu=True, **kw)
        self.conv2 = SConv2d(cout, cout, 3, 1, 1, **kw)
        self.bn2 = SBatchNorm2d(cout, num_switches=num_switches, **kw)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(SConv2d(cin, cout, 1, stride, **kw),
                                          SBatchNorm2d(cout, num_switches=num_switches, **kw))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.shortcut(x))


class PlainResNet(nn.Module):
    """CIFAR ResNet with 1x1-conv shortcuts, layer for layer as ``slimkern.models.CifarResNet``."""

    def __init__(self, stage_channels=(16, 32, 64), blocks=(3, 3, 3), num_classes=10, max_width=1.0,
                 width_mult=1.0, num_switches=1):
        super().__init__()
        chans = [_scaled(c, width_mult) for c in stage_channels]
        kw = {"max_width": max_width}
        self.stem = nn.Sequential(SConv2d(3, chans[0], 3, 1, 1, slice_in=False, **kw),
                                  SBatchNorm2d(chans[0], num_switches=num_switches, relu=True, **kw))
        layers, cin = [], chans[0]
        for i, (c, n) in enumerate(zip(chans, blocks)):
            for j in range(n):
                layers.append(PlainBasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1, max_width, num_switches))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SLinear(cin, num_classes, **kw)

    def forward(self, x):
        f = torch.flatten(self.pool(self.layers(self.stem(x))), 1)
        return self.classifier(f), f


def build_plain(name: str, num_classes=10, max_width=1.0, width_mult=1.0, num_switches=1) -> nn.Module:
    if name == "mobilenet_v1":
        return PlainMobileNetV1(num_classes, max_width, width_mult, num_switches)
    if name == "resnet20":
        return PlainResNet((16, 32, 64), (3, 3, 3), num_classes, max_width, width_mult, num_switches)
    raise ValueError(f"no plain reference for {name!r}")


@torch.no_grad()
def load_from_slim(plain: nn.Module, slim: nn.Module) -> None:
    """Copies the parameters of a ``slimkern.models`` net into ``plain`` (same names and shapes)."""
    src = dict(slim.named_parameters())
    dst = dict(plain.named_parameters())
    if set(src) != set(dst):
        raise ValueError(f"parameter names differ: {sorted(set(src) ^ set(dst))[:6]}")
    for k, p in dst.items():
        if p.shape != src[k].shape:
            raise ValueError(f"{k}: shape {tuple(p.shape)} vs {tuple(src[k].shape)}")
        p.copy_(src[k])


def _set_branch(net: nn.Module, width_mult, bn_idx: int, with_bias: bool) -> None:
    for m in net.modules():
        if isinstance(m, (SConv2d, SBatchNorm2d, SLinear)):
            m.width_mult = width_mult
        if isinstance(m, SBatchNorm2d):
            m.bn_idx = bn_idx
        if isinstance(m, SLinear):
            m.with_bias = with_bias


def forward_switch(net: nn.Module, x: torch.Tensor, branches, bn_idx: int):
    """One switch: one forward per branch ``(f0, f1)``. Returns (logits, features zero-padded to
    the classifier's full input width)."""
    logits, feat = None, None
    full = net.classifier.in_features
    for b, wm in enumerate(branches):
        _set_branch(net, tuple(wm), bn_idx, b == 0)
        z, f = net(x)
        i0, i1 = _range(wm, net.classifier.base_in, net.classifier.max_width)
        f = F.pad(f, (i0, full - i1))
        logits = z if logits is None else logits + z
        feat = f if feat is None else feat + f
    return logits, feat


def train_step(net: nn.Module, x: torch.Tensor, switches, loss_fn) -> list[torch.Tensor]:
    """The slimmable_networks loop: for each switch, set the width, forward, loss, backward
    (gradients accumulate). ``switches``: list of branch lists ``[(f0, f1), ...]``; switch i
    uses BN statistics set i. ``loss_fn(i, logits, features, prev)`` as in
    ``slimkern.train.packed_step`` (``prev``: detached (logits, features) of earlier switches)."""
    prev, losses = [], []
    for i, branches in enumerate(switches):
        z, f = forward_switch(net, x, branches, i)
        loss = loss_fn(i, z, f, prev)
        loss.backward()
        prev.append((z.detach(), f.detach()))
        losses.append(loss.detach())
    return losses


# ---- the losses of the benchmark's two steps (plain torch, shared by every provider) -------

def _kd(z, t):
    return -(F.softmax(t, 1) * F.log_softmax(z, 1)).sum(1).mean()


def paradis_loss(y: torch.Tensor, beta: float = 1.0, teacher: int = 0, full: int = 1):
    """ParaDiS Algorithm 1 (Ozerov et al.): CE for the wide teacher (switch ``teacher``), KD from
    the teacher's logits for every other switch, plus ``beta`` * MSE of the zero-padded features
    against those of the full ``[1.0]`` switch (``full``) for the remaining switches."""
    def loss(i, z, f, prev):
        if i == teacher:
            return F.cross_entropy(z, y)
        kd = _kd(z, prev[teacher][0])
        if i == full or beta == 0:
            return kd
        return kd + beta * F.mse_loss(f, prev[full][1])
    return loss


def sandwich_loss(y: torch.Tensor):
    """US-Nets sandwich rule with in-place distillation: CE for the max width (switch 0), KD from
    its logits for the others."""
    def loss(i, z, f, prev):
        return F.cross_entropy(z, y) if i == 0 else _kd(z, prev[0][0])
    return loss
