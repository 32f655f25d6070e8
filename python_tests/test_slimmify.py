import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkern as sk
from slimkern.nn import SlimConv2d, SlimLinear, SwitchableBatchNorm2d

tvm = pytest.importorskip("torchvision.models")


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.num_batches_tracked.fill_(10)
    return model


class Plain(nn.Module):
    """stem conv -> BN -> ReLU -> residual(conv, BN) -> depthwise conv -> BN -> ReLU6 -> pool -> linear."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn1(self.conv(x))
        x = self.act(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("ctor", [tvm.resnet18, tvm.mobilenet_v2], ids=["resnet18", "mobilenet_v2"])
def test_torchvision_round_trip(ctor):
    torch.manual_seed(0)
    model = randomize_bn(ctor(weights=None, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for mw in (1.0, 1.5):
            net = sk.slimmify(model, max_width=mw).eval()
            assert isinstance(net, sk.nn.SlimNet)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the 1.0x BN row holds the model's statistics
                out = net(x)
                out2 = net.set_switch("[1.0]x")(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == sk.profile(net, "[1.0]x", (1, 3, 32, 32)).params


def test_resnet18_groups_and_layers():
    net = sk.slimmify(tvm.resnet18(weights=None, num_classes=10), max_width=1.5)
    mods = dict(net.named_modules())
    assert isinstance(mods["conv1"], SlimConv2d) and not mods["conv1"].slice_in
    assert isinstance(mods["fc"], SlimLinear) and not mods["fc"].slice_out and mods["fc"].slice_in
    assert mods["conv1"].weight.shape == (96, 3, 7, 7)  # 64 * 1.5, the image input not widened
    assert mods["fc"].weight.shape == (10, 768)
    # residual adds tie block outputs to the stem; a downsample shortcut starts the stage's group
    assert mods["layer1.1.conv2"].out_group == mods["conv1"].out_group == "conv1"
    assert mods["layer2.0.downsample.0"].out_group == mods["layer2.0.conv2"].out_group
    assert mods["layer2.1.bn2"].group == mods["layer2.0.conv2"].out_group
    assert mods["layer2.0.downsample.0"].in_group == "conv1"
    assert mods["layer1.0.conv1"].out_group == "layer1.0.conv1" != "conv1"
    assert mods["fc"].in_group == mods["layer4.1.conv2"].out_group
    assert set(net.width_groups["conv1"]) >= {"conv1", "bn1", "layer1.0.conv2", "layer2.0.conv1"}
    # a per-layer switch addresses the groups
    counts = {g: 8 for g in net.width_groups}
    net.set_switch(sk.Switch.from_channels(counts))
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenet_v2_depthwise_shares_group():
    net = sk.slimmify(tvm.mobilenet_v2(weights=None, num_classes=10))
    mods = dict(net.named_modules())
    dw = mods["features.2.conv.1.0"]
    assert dw.depthwise and dw.in_group == dw.out_group == mods["features.2.conv.0.0"].out_group
    # the identity add of block 3 ties its projection to block 2's
    assert mods["features.3.conv.2"].out_group == mods["features.2.conv.2"].out_group


def hand_branch(model, x, c0, c1):
    """The plain sub-network of ``Plain`` on channels [c0, c1), training-mode BN (batch stats)."""
    s = slice(c0, c1)
    m = model

    def bn(b, t):
        return F.batch_norm(t, None, None, b.weight[s], b.bias[s], True, 0.0, b.eps)

    h = F.relu(bn(m.bn0, F.conv2d(x, m.stem.weight[s], padding=1)))
    h = h + bn(m.bn1, F.conv2d(h, m.conv.weight[s, s], m.conv.bias[s], padding=1))
    h = F.relu6(bn(m.bn2, F.conv2d(h, m.dw.weight[s], stride=2, padding=1, groups=c1 - c0)))
    return F.linear(h.mean((2, 3)), m.fc.weight[:, s])


@pytest.mark.parametrize("sw, ranges", [("[0.5, 0.5]x", [(0, 4), (4, 8)]), ("[0.5]x", [(0, 4)]),
                                        ("[0.25:0.75]x", [(2, 6)]), ("[0.5, 0.25, 0.25]x", [(0, 4), (4, 6), (6, 8)])])
def test_slimmified_equals_hand_built_subnetworks(sw, ranges):
    torch.manual_seed(1)
    model = Plain()
    net = sk.slimmify(model).train().set_switch(sw)
    x = torch.randn(4, 3, 8, 8)
    out = net(x)
    ref = sum(hand_branch(model, x, a, b) for a, b in ranges) + model.fc.bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # gradients reach the same weights in the same amounts
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(net.conv.weight.grad, model.conv.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.stem.weight.grad, model.stem.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.fc.weight.grad, model.fc.weight.grad, rtol=1e-4, atol=1e-5)


def test_slimmified_packed_switches_and_export():
    torch.manual_seed(2)
    net = sk.slimmify(randomize_bn(Plain()), max_width=1.5)
    sws = ["[1.5]x", "[0.5, 0.25, 0.25]x", "[0.25:0.75]x"]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        packed = net.forward_switches(x, sws)  # train mode: also fills each switch's BN row
        net.eval()
        for sw, p in zip(sws, packed):
            with net.use_switch(sw):
                ref = net(x)
                dep = sk.export(net, sw)
            torch.testing.assert_close(dep(x), ref, rtol=1e-5, atol=1e-5)
            assert len(dep.branches) == sk.Switch.parse(sw).num_branches


def test_slimmified_resnet18_paradis_export():
    torch.manual_seed(3)
    net = sk.slimmify(tvm.resnet18(weights=None, num_classes=10))
    sw = "[0.5, 0.25, 0.25]x"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        net.train().set_switch(sw)(x)
        net.eval()
        ref = net(x)
        dep = sk.export(net, sw)
        torch.testing.assert_close(dep(x), ref, rtol=1e-4, atol=1e-5)
    prof = sk.profile(net, sw, (1, 3, 16, 16))
    assert [b.params for b in prof.branches] == [sum(p.numel() for p in b.parameters()) for b in dep.branches]
    assert prof.max_device_macs == prof.branches[0].macs < prof.macs


def test_state_dict_and_deepcopy():
    model = randomize_bn(Plain()).eval()
    net = sk.slimmify(model, max_width=1.25).eval()
    assert set(net.state_dict()) >= {k for k in model.state_dict()}
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = sk.slimmify(Plain(), max_width=1.25).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
        twin = copy.deepcopy(net)
        assert isinstance(twin, sk.nn.SlimNet)
        buf = io.BytesIO()
        torch.save(net, buf)  # whole-module pickle keeps the SlimNet class
        buf.seek(0)
        whole = torch.load(buf, weights_only=False)
        assert isinstance(whole, sk.nn.SlimNet) and whole.width_groups == net.width_groups
        torch.testing.assert_close(whole(x), model(x))
        with pytest.warns(RuntimeWarning, match="no BN statistics yet"):  # [0.5]x never trained
            torch.testing.assert_close(twin.set_switch("[0.5]x")(x), net.set_switch("[0.5]x")(x))


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class Branchy(Plain):
    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def test_bad_input():
    with pytest.raises(ValueError, match="max_width must be a number >= 1.0"):
        sk.slimmify(Plain(), max_width=0.5)
    with pytest.raises(RuntimeError, match="could not trace Branchy with torch.fx"):
        sk.slimmify(Branchy())
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\) cannot be sliced"):
        sk.slimmify(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 2, 2]), nn.Flatten(), nn.Linear(16, 2)))
    with pytest.raises(ValueError, match=r"layer '1' \(Conv2d\) is a grouped conv \(groups=2"):
        sk.slimmify(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="channel concatenation .*cat.* is not supported"):
        sk.slimmify(Cat())
    with pytest.raises(ValueError, match="flatten over spatial positions"):
        sk.slimmify(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 2)))
    net = sk.slimmify(Plain())
    with pytest.raises(ValueError, match="already a slimkern layer"):
        sk.slimmify(net)
    with pytest.raises(ValueError, match="cannot parse switch '\\[0.5, 0.5'"):
        net.set_switch("[0.5, 0.5")
    with pytest.raises(ValueError, match="above the net's max_width"):
        net.set_switch("[1.5]x")


def test_mlp_with_batchnorm1d():
    torch.manual_seed(4)
    model = randomize_bn(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                       nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))).eval()
    net = sk.slimmify(model, max_width=1.5).eval()
    mods = dict(net.named_modules())
    assert isinstance(mods["2"], sk.nn.SlimBatchNorm1d) and not mods["1"].slice_in and not mods["7"].slice_out
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
        net.train().set_switch("[0.5, 0.5]x")(torch.randn(8, 3, 2, 2))
        net.eval()
        ref = net(x)
        dep = sk.export(net, "[0.5, 0.5]x")
        torch.testing.assert_close(dep(x), ref)
        assert isinstance(dep.branches[1].get_submodule("2"), nn.BatchNorm1d)
        assert dep.branches[1].get_submodule("4").weight.shape == (3, 4)
