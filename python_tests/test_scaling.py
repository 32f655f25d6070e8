"""Appendix F switches: the free (untrained) switches run and equal hand-built fused sub-networks."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkern
from slimkern import scaling
from slimkern.models.resnet import CifarResNet


def _bounds(fracs, c):
    """Channel boundaries by hand: cumulative fractions, half rounds up."""
    cum, out = 0.0, [0]
    for f in fracs:
        cum += f
        out.append(int(math.floor(cum * c + 0.5)))
    return list(zip(out[:-1], out[1:]))


def _conv(m, o, i):
    c = nn.Conv2d(i[1] - i[0], o[1] - o[0], m.kernel_size, m.stride, m.padding, bias=False)
    c.weight.data.copy_(m.weight[o[0]:o[1], i[0]:i[1]])
    return c


def _bn(m, o, row):
    b = nn.BatchNorm2d(o[1] - o[0], eps=m.eps).eval()
    b.weight.data.copy_(m.weight[o[0]:o[1]])
    b.bias.data.copy_(m.bias[o[0]:o[1]])
    b.running_mean.copy_(m.running_mean[row, o[0]:o[1]])
    b.running_var.copy_(m.running_var[row, o[0]:o[1]])
    return b


def hand_built(net: CifarResNet, sw: slimkern.Switch, x):
    """Branch by branch with plain torch layers on hand-computed channel ranges; partial logits
    summed, classifier bias once."""
    fr = [hi - lo for lo, hi in sw.branches]
    chans = [net.stem[0].out_channels] + [blk.conv1.out_channels for blk in net.layers]
    logits = net.classifier.bias.detach().clone().expand(x.shape[0], -1)
    for b in range(len(fr)):
        rng = lambda c: _bounds(fr, c)[b]  # noqa: E731
        row = net.stem[1].switch_row(sw)
        h = F.relu(_bn(net.stem[1], rng(chans[0]), row)(_conv(net.stem[0], rng(chans[0]), (0, 3))(x)))
        cin = chans[0]
        for blk in net.layers:
            c = blk.conv1.out_channels
            y = F.relu(_bn(blk.bn1, rng(c), row)(_conv(blk.conv1, rng(c), rng(cin))(h)))
            y = _bn(blk.bn2, rng(c), row)(_conv(blk.conv2, rng(c), rng(c))(y))
            sc = h if len(blk.shortcut) == 0 else _bn(blk.shortcut[1], rng(c), row)(
                _conv(blk.shortcut[0], rng(c), rng(cin))(h))
            h, cin = F.relu(y + sc), c
        f = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        lo, hi = rng(cin)
        logits = logits + f @ net.classifier.weight[:, lo:hi].t()
    return logits


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = CifarResNet([16, 32, 64], [1, 1, 1], 10, 3, max_width=1.2, width_mult=0.5)
    sws = [slimkern.Switch.parse(s) for s in scaling.eval_switches()]
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    with torch.no_grad():  # BN affine away from 1/0 so the rows matter
        for m in n.modules():
            if isinstance(m, slimkern.nn.SwitchableBatchNorm2d):
                m.weight.add_(0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.2 * torch.randn(m.bias.shape, generator=g))
    slimkern.calibrate_bn(n, calib, sws)
    return n.eval()


def test_f1_free_switches_tile_the_full_width():
    assert len(scaling.FREE_F1) == 6
    for s in scaling.FREE_F1:
        sw = slimkern.Switch.parse(s)
        assert sw.num_branches >= 3 and abs(sw.total_width - 1.0) < 1e-9
        assert sw not in [slimkern.Switch.parse(t) for v in scaling.VARIANTS.values() for t in v]
    assert len(scaling.VARIANTS["F.2 8-switch"]) == 8 and len(scaling.VARIANTS["F.1 5-switch"]) == 5


@pytest.mark.parametrize("s", scaling.FREE_F1 + ["[8x0.125]x", "[0.375, 0.375]x", "[0.25, 0.25]x"])
def test_free_switch_equals_hand_built_fused_sub_networks(net, s):
    sw = slimkern.Switch.parse(s)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with slimkern.use_switch(net, sw):
            y = net(x)
        ref = hand_built(net, sw, x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_hand_built_reference_can_fail(net):
    """Another switch's BN row (or ranges) gives different logits: the comparison is sharp."""
    sw, other = slimkern.Switch.parse(scaling.FREE_F1[0]), slimkern.Switch.parse(scaling.FREE_F1[1])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        with slimkern.use_switch(net, sw):
            y = net(x)
        assert not torch.allclose(y, hand_built(net, other, x), rtol=1e-3, atol=1e-3)


def test_all_free_switches_in_one_packed_pass(net):
    sws = [slimkern.Switch.parse(s) for s in scaling.FREE_F1]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        outs = slimkern.forward_switches(net, x, sws)
        for sw, y in zip(sws, outs):
            with slimkern.use_switch(net, sw):
                torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_eval_rows(tmp_path):
    rows = scaling.train_eval({**scaling.DEFAULTS, "epochs": 1, "out": str(tmp_path)}, "F.1 5-switch", 0)
    got = {r["switch"]: r for r in rows}
    assert set(got) == set(str(slimkern.Switch.parse(s)) for s in scaling.eval_switches())
    assert got["[0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]x"]["trained"]
    assert not got[str(slimkern.Switch.parse(scaling.FREE_F1[0]))]["trained"]
    assert all(0.0 <= r["top1"] <= 1.0 and r["macs"] > 0 for r in rows)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        scaling.train_eval(scaling.DEFAULTS, "F.3", 0)


def test_short_notation_round_trips():
    for s in scaling.eval_switches():
        short = scaling.short(str(slimkern.Switch.parse(s)))
        assert slimkern.Switch.parse(short + "x") == slimkern.Switch.parse(s)
    assert scaling.short("[0.25, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]x") == "[0.25, 6x0.125]"
