import io

import pytest
import torch
import torch.nn as nn

import slimkern as sk
from small_slim_nets import TinyResNet, train_stats

SWITCHES = ["[1.0]x", "[0.5]x", "[0.5, 0.25, 0.25]x", "[0.25:0.75]x", "[4x0.25]x"]
PLAIN = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.Sequential)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = TinyResNet(max_width=1.5)
    with torch.no_grad():  # non-trivial affine parameters
        for m in n.modules():
            if isinstance(m, sk.nn.SwitchableBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return train_stats(n, SWITCHES + ["[1.5]x"])


@pytest.mark.parametrize("sw", SWITCHES + ["[1.5]x"])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_export_equals_net(net, sw, fold_bn):
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), net.use_switch(sw):
        ref = net(x)
        dep = sk.export(net, sw, fold_bn=fold_bn)
        out = dep(x)
    assert len(dep.branches) == sk.Switch.parse(sw).num_branches
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for b in dep.branches:  # standard torch layers only
        for name, m in b.named_modules():
            if name and list(m.children()) == []:
                assert isinstance(m, PLAIN), (name, type(m))
    assert torch.equal(dep.bias.detach(), net.fc.bias.detach())


def test_branch_is_the_hand_built_subnetwork(net):
    """Branch 1 of [0.5, 0.25, 0.25] is the plain net on channels [4, 6) with the switch's BN row."""
    sw = sk.Switch([0.5, 0.25, 0.25])
    dep = sk.export(net, sw)
    row = net.bn0.switch_row(sw)
    s = slice(4, 6)
    x = torch.randn(2, 3, 8, 8)
    F = nn.functional

    def bn(m, t):
        return F.batch_norm(t, m.running_mean[row, s], m.running_var[row, s], m.weight[s], m.bias[s], False, 0.0, m.eps)

    with torch.no_grad():
        h = F.relu(bn(net.bn0, F.conv2d(x, net.stem.weight[s], padding=1)))
        h = h + bn(net.bn1, F.conv2d(h, net.conv.weight[s, s], padding=1))
        h = F.relu(bn(net.bn2, F.conv2d(h, net.dw.weight[s], stride=2, padding=1, groups=2)))
        ref = F.linear(h.mean((2, 3)), net.fc.weight[:, s])
        torch.testing.assert_close(dep.branches[1](x), ref, rtol=1e-5, atol=1e-5)


def test_torch_export_and_weights_only_roundtrip(net):
    sw = "[0.5, 0.25, 0.25]x"
    dep = sk.export(net, sw)
    x = torch.randn(2, 3, 8, 8)
    b = dep.branches[2]
    ep = torch.export.export(b, (x,))
    torch.testing.assert_close(ep.module()(x), b(x))
    buf = io.BytesIO()
    torch.save(dep.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # a fresh deployable of an untrained net, then load the saved weights into it
    other = train_stats(TinyResNet(max_width=1.5), [sw], steps=1, seed=5)
    fresh = sk.export(other, sw)
    assert not torch.allclose(fresh(x), dep(x))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), dep(x))


def test_export_errors(net):
    with pytest.raises(ValueError, match="has no BN statistics for switch \\[0.75\\]x"):
        sk.export(net, "[0.75]x")
    with pytest.raises(ValueError, match="above the net's max_width"):
        sk.export(net, "[2.0]x")
    with pytest.raises(ValueError, match="Switch|switch"):
        sk.export(net, "[0.5, 0.5")
    with pytest.raises(ValueError, match="no slimkern layers"):
        sk.export(nn.Linear(3, 4), "[1.0]x")

    class After(TinyResNet):
        def forward(self, x):
            return torch.softmax(super().forward(x), 1)

    # an epilogue that reads only the fused output runs once on the sum (dep.fusion)
    after = train_stats(After(), ["[0.5, 0.5]x"])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), after.use_switch("[0.5, 0.5]x"):
        torch.testing.assert_close(sk.export(after, "[0.5, 0.5]x")(x), after(x), rtol=1e-5, atol=1e-6)

    class Leaky(TinyResNet):  # reads a branch's own channels after the classifier
        def forward(self, x):
            return super().forward(x) + self.stem(x).mean()

    with pytest.raises(ValueError, match="depends on a branch's own channels"):
        sk.export(train_stats(Leaky(), ["[0.5, 0.5]x"]), "[0.5, 0.5]x")

    class Untraceable(TinyResNet):
        def forward(self, x):
            if x.sum() > 0:
                return super().forward(x)
            return super().forward(-x)

    with pytest.raises(RuntimeError, match="could not trace Untraceable with torch.fx"):
        sk.export(Untraceable(), "[1.0]x")


@pytest.mark.parametrize("name", ["mobilenet_v1", "resnet20"])
def test_project_models_export_and_profile(name):
    models = pytest.importorskip("slimkern.models")
    torch.manual_seed(0)
    net = models.build(name, num_classes=10, max_width=1.2, width_mult=0.25)
    sws = ["[0.5, 0.25, 0.25]x", "[0.25:0.75]x"]  # ParaDiS and an offset window
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        net.train()
        net.forward_switches(torch.randn(2, 3, 16, 16), sws)
        net.eval()
        for sw in sws:
            with net.use_switch(sw):
                ref = net(x)
            dep = sk.export(net, sw)
            torch.testing.assert_close(dep(x), ref, rtol=1e-4, atol=1e-5)
            prof = sk.profile(net, sw, (1, 3, 16, 16))
            assert prof.params == sum(p.numel() for p in dep.parameters())
            assert [b.params for b in prof.branches] == [sum(p.numel() for p in b.parameters())
                                                          for b in dep.branches]


def test_export_refuses_placeholder_statistics_after_a_bare_eval_forward():
    """An eval forward of a new switch adds a BN row at mean 0 / var 1 (with a warning); export
    must not deploy that placeholder as if it were measured."""
    import warnings

    torch.manual_seed(0)
    n = train_stats(TinyResNet(max_width=1.5), ["[1.0]x"])
    n.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with n.use_switch("[0.5, 0.5]x"):
            n(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"export: layer '\w+' \(and \d+ more BN layers\) has no BN statistics for "
                                         r"switch \[0.5, 0.5\]x.*placeholder.*calibrate_bn"):
        sk.export(n, "[0.5, 0.5]x")
    sk.export(n, "[1.0]x")  # measured rows export
    sk.calibrate_bn(n, [torch.randn(4, 3, 8, 8) for _ in range(2)], ["[0.5, 0.5]x"])
    sk.export(n, "[0.5, 0.5]x")


def test_export_messages_name_the_real_problem_once(net):
    with pytest.raises(ValueError, match="above the net's max_width") as info:
        sk.export(net, "[2.0]x")
    assert "BN statistics" not in str(info.value)
    from slimkern._branch import BranchGraph

    with pytest.raises(ValueError) as info:
        BranchGraph(net, "export").branch(sk.Switch.parse("[0.3]x"), 0)
    msg = str(info.value)
    assert "has no BN statistics" in msg and msg.count("layer ") == 1, msg
