"""slimkern.prune.prune_channels: pruned == masked, residual-tied groups, export, profile, errors."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkern as sk
from slimkern.prune import apply_masks, channel_groups, keep_masks, normalize_keep, prune_channels, pruned_profile

pytestmark = pytest.mark.usefixtures("exact_fp32")


def _randomize(net, seed=0):
    """Non-trivial BN affine and [1.0]x statistics (a few training passes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, sk.nn.SwitchableBatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        net.train()
        for _ in range(2):
            net(torch.randn(4, 3, 16, 16, generator=g))
    return net.eval()


def _random_keep(groups, seed):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, grp in groups.items():
        k = max(1, grp.channels // 2)
        keep[name] = torch.randperm(grp.channels, generator=g)[:k]  # unsorted on purpose
    return keep


@pytest.fixture(scope="module")
def mbv2():
    torch.manual_seed(0)
    return _randomize(sk.models.mobilenet_v2(width_mult=0.25, last_channels=32))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(1)
    return _randomize(sk.models.resnet20(width_mult=0.25))


@pytest.mark.parametrize("which", ["mbv2", "resnet"])
def test_pruned_equals_masked(which, request):
    net = request.getfixturevalue(which)
    groups = channel_groups(net)
    keep = _random_keep(groups, 3)
    x = torch.randn(3, 3, 16, 16)
    pruned = prune_channels(net, keep).eval()
    with torch.no_grad():
        full = net(x)
        with apply_masks(net, keep_masks(normalize_keep(keep, groups), groups)):
            masked = net(x)
        out = pruned(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert (out - full).abs().max() > 1e-2  # pruning half the channels changes the outputs
    # physically smaller: every kept layer has exactly the kept channel counts
    counts = {n: len(k) for n, k in keep.items()}
    mods = dict(pruned.named_modules())
    for name, grp in groups.items():
        for p in grp.producers:
            assert mods[p].out_channels == counts[name], p
        for c in grp.consumers:
            m = mods[c]
            assert (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) == counts[name], c
        for b in grp.norms:
            bn = mods[b][0] if isinstance(mods[b], nn.Sequential) else mods[b]
            assert bn.num_features == counts[name] and bn.running_mean.shape == (counts[name],)
    assert not any(isinstance(m, sk.nn.SlimConv2d) for m in pruned.modules())


def test_resnet_residual_groups_share_indices(resnet):
    groups = channel_groups(resnet)
    # stage 1's stem, three blocks' second convs (and a stage's shortcut) write one group
    assert groups["s1"].producers == ["stem.0", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2"]
    assert "layers.3.shortcut.0" in groups["s2"].producers and len(groups["s2"].producers) == 4
    keep = {"s1": [0, 2, 3]}
    pruned = prune_channels(resnet, keep)
    for name in groups["s1"].producers:
        src = resnet.get_submodule(name).weight[[0, 2, 3]]
        dst = pruned.get_submodule(name).weight
        assert torch.equal(dst, src.index_select(1, torch.arange(dst.shape[1])) if name != "stem.0" else src)
    # the classifier reads group s3, untouched here: weight and bias copied whole
    torch.testing.assert_close(pruned.classifier.weight, resnet.classifier.weight[:, :16])
    torch.testing.assert_close(pruned.classifier.bias, resnet.classifier.bias)


def test_keep_all_reproduces_the_net(mbv2):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prune_channels(mbv2, {})(x), mbv2(x), rtol=1e-5, atol=1e-5)


class PlainNet(nn.Module):
    """stem -> BN -> relu -> [conv -> BN] + residual -> dw(stride 2) -> BN -> relu -> pool -> fc."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn1(self.conv(x))
        x = F.relu(self.bn2(self.dw(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(2)
    m = PlainNet()
    with torch.no_grad():
        for bn in (m.bn0, m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_plain_model_against_hand_built_subnetwork(plain):
    """A plain torch model is slimmified for its groups; the pruned model is the hand-built one."""
    keep = [1, 4, 5]
    pruned = prune_channels(plain, {"stem": keep})
    k = torch.tensor(keep)
    x = torch.randn(2, 3, 8, 8)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean[k], m.running_var[k], m.weight[k], m.bias[k], False, 0.0, m.eps)

    p = plain
    with torch.no_grad():
        h = F.relu(bn(p.bn0, F.conv2d(x, p.stem.weight[k], padding=1)))
        h = h + bn(p.bn1, F.conv2d(h, p.conv.weight[k][:, k], p.conv.bias[k], padding=1))
        h = F.relu(bn(p.bn2, F.conv2d(h, p.dw.weight[k], stride=2, padding=1, groups=3)))
        ref = F.linear(h.mean((2, 3)), p.fc.weight[:, k], p.fc.bias)
        torch.testing.assert_close(pruned(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prune_channels(plain, {})(x), plain(x), rtol=1e-5, atol=1e-5)


def test_profile_of_pruned_equals_masked_and_hand_count(plain):
    keep = {"stem": [0, 2, 3, 5]}
    pruned = prune_channels(plain, keep)
    a = sk.profile(pruned, input_size=(1, 3, 8, 8))
    b = pruned_profile(plain, keep, input_size=(1, 3, 8, 8))
    k = 4
    macs = 3 * k * 9 * 64 + k * k * 9 * 64 + k * 9 * 16 + k * 10  # stem, conv, dw (stride 2), fc
    params = 3 * k * 9 + (k * k * 9 + k) + k * 9 + (10 * k + 10) + 3 * 2 * k
    assert a.macs == b.macs == macs
    assert a.params == b.params == params == sum(t.numel() for t in pruned.parameters())
    assert a.peak_activation_bytes == b.peak_activation_bytes > 0
    full = sk.profile(plain, input_size=(1, 3, 8, 8))
    assert full.macs > a.macs and full.peak_activation_bytes > a.peak_activation_bytes


def test_profile_pruned_mobilenet_v2_matches_pruned_profile(mbv2):
    keep = _random_keep(channel_groups(mbv2), 5)
    a = sk.profile(prune_channels(mbv2, keep), input_size=(1, 3, 16, 16))
    b = pruned_profile(mbv2, keep, input_size=(1, 3, 16, 16))
    assert (a.macs, a.params, a.peak_activation_bytes) == (b.macs, b.params, b.peak_activation_bytes)
    assert a.macs < sk.profile(mbv2, input_size=(1, 3, 16, 16)).macs


def test_torch_export_and_weights_only_roundtrip(resnet):
    keep = _random_keep(channel_groups(resnet), 7)
    pruned = prune_channels(resnet, keep).eval()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(pruned, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), pruned(x))
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = prune_channels(_randomize(sk.models.resnet20(width_mult=0.25), seed=9), keep).eval()
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x), pruned(x))


def test_bool_mask_and_index_forms_agree(resnet):
    m = torch.zeros(8, dtype=torch.bool)
    m[[1, 6]] = True
    a = prune_channels(resnet, {"s2": m})
    b = prune_channels(resnet, {"s2": [6, 1]})
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("keep, err, match", [
    ({"nope": [0]}, ValueError, "unknown width group"),
    ({"s1": [0, 4]}, ValueError, r"in \[0, 4\)"),
    ({"s1": [-1]}, ValueError, r"in \[0, 4\)"),
    ({"s1": [1, 1]}, ValueError, "twice"),
    ({"s1": []}, ValueError, "no channel"),
    ({"s1": torch.tensor([0.0, 1.0])}, TypeError, "integer indices or a bool mask"),
    ({"s1": torch.ones(3, dtype=torch.bool)}, ValueError, "needs 4 entries"),
    ({"s1": [0.5]}, TypeError, "must be ints"),
    ([("s1", [0])], TypeError, "mapping"),
])
def test_bad_keep(resnet, keep, err, match):
    with pytest.raises(err, match=match):
        prune_channels(resnet, keep)


def test_missing_base_statistics_is_a_clear_error():
    net = sk.models.resnet20(width_mult=0.25).eval()  # never trained: no [1.0]x BN row
    with pytest.raises(ValueError, match="no BN statistics"):
        prune_channels(net, {})


def test_torchvision_mobilenet_v2_through_slimmify():
    tv = pytest.importorskip("torchvision")
    from slimkern.prune import DepthwiseGates
    torch.manual_seed(4)
    m = tv.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        m.classifier[1].weight.normal_(0, 0.3)
    net = sk.slimmify(m)
    groups = channel_groups(net)
    assert len(DepthwiseGates(net).names) == 17  # one gated depthwise input per inverted-residual block
    keep = _random_keep(groups, 11)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with apply_masks(net, keep_masks(normalize_keep(keep, groups), groups)):
            masked = net(x)
        out = prune_channels(m, keep)(x)
        torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
        assert (out - m(x)).abs().max() > 1e-2
        torch.testing.assert_close(prune_channels(m, {})(x), m(x), rtol=1e-4, atol=1e-5)  # the original model
