"""slimkern.nn: equivalence with hand-built sub-networks, packed multi-switch forward, BN rows,
calibration, parameter_ranges, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk
from slimkern.nn import (SlimBatchNorm1d, SlimConv2d, SlimLinear, SlimNet, SwitchableBatchNorm2d,
                         parameter_ranges, register_switches)



@pytest.fixture(autouse=True)
def _float64():
    """float64 for tight equivalence checks, restored so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class TinyNet(SlimNet):
    """conv-bn-relu stem (image not sliced), depthwise conv-bn-relu, stride-2 pointwise
    conv-bn, residual add, pool, fused linear classifier."""

    def __init__(self, c=12, classes=5, max_width=1.0, in_ch=3):
        super().__init__()
        kw = {"max_width": max_width}
        self.stem = SlimConv2d(in_ch, c, 3, padding=1, bias=False, slice_in=False, **kw)
        self.bn1 = SwitchableBatchNorm2d(c, **kw)
        self.dw = SlimConv2d(c, c, 3, padding=1, groups=c, bias=False, **kw)
        self.bn2 = SwitchableBatchNorm2d(c, **kw)
        self.pw = SlimConv2d(c, c, 1, **kw)
        self.bn3 = SwitchableBatchNorm2d(c, **kw)
        self.down = SlimConv2d(c, 2 * c, 3, stride=2, padding=1, **kw)
        self.fc = SlimLinear(2 * c, classes, slice_out=False, **kw)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        y = F.relu(self.bn2(self.dw(x)))
        x = F.relu(x + self.bn3(self.pw(y)))
        x = F.relu(self.down(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _bn_ref(bn, h, sw, s, e, training):
    if training:
        return F.batch_norm(h, None, None, bn.weight[s:e], bn.bias[s:e], True, 0.0, bn.eps)
    r = bn.switch_row(sw)
    return F.batch_norm(h, bn.running_mean[r, s:e], bn.running_var[r, s:e], bn.weight[s:e], bn.bias[s:e],
                        False, 0.0, bn.eps)


def ref_forward(net, x, sw, training, return_features=False):
    """The switch's sub-networks built by hand from plain torch ops on sliced weights."""
    logits, feats = 0, torch.zeros(x.shape[0], net.fc.in_full)
    c = net.stem.out_channels
    for b, (lo, hi) in enumerate(sw.branches):
        s, e = round(lo * c + 1e-9 + 0.5 - 0.5), None  # recomputed below by hand
        s, e = int(lo * c + 0.5), int(hi * c + 0.5)
        s2, e2 = int(lo * 2 * c + 0.5), int(hi * 2 * c + 0.5)
        h = F.conv2d(x, net.stem.weight[s:e], None, 1, 1)
        h = F.relu(_bn_ref(net.bn1, h, sw, s, e, training))
        y = F.conv2d(h, net.dw.weight[s:e], None, 1, 1, 1, e - s)
        y = F.relu(_bn_ref(net.bn2, y, sw, s, e, training))
        y = F.conv2d(y, net.pw.weight[s:e, s:e], net.pw.bias[s:e])
        h = F.relu(h + _bn_ref(net.bn3, y, sw, s, e, training))
        h = F.relu(F.conv2d(h, net.down.weight[s2:e2, s:e], net.down.bias[s2:e2], 2, 1))
        f = F.adaptive_avg_pool2d(h, 1).flatten(1)
        feats[:, s2:e2] = f
        logits = logits + F.linear(f, net.fc.weight[:, s2:e2])
    logits = logits + net.fc.bias
    return (logits, feats) if return_features else logits


SWITCHES = [sk.Switch([1.0]), sk.Switch([0.5]), sk.Switch([0.5, 0.25, 0.25]), sk.Switch.ranges([(0.25, 0.75)]),
            sk.Switch.parse("[4x0.25]x")]


def _snapshot(net):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in net.state_dict().items()}


def _grads(net):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}


@pytest.mark.parametrize("sw", SWITCHES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_single_switch_matches_hand_built(sw, training):
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(4, 3, 8, 8)
    net.set_switch(sw)
    if not training:  # give the row real statistics first
        net.train()
        for _ in range(3):
            net(torch.randn(4, 3, 8, 8))
    net.train(training)
    out = net(x)
    assert out.shape == (4, 5)
    out.square().sum().backward()
    g = _grads(net)
    net.zero_grad()
    ref = ref_forward(net, x, sw, training)
    torch.testing.assert_close(out, ref)
    ref.square().sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(g[n], p.grad if p.grad is not None else torch.zeros_like(p), msg=n)


def test_wide_switch_and_base_equivalence():
    torch.manual_seed(1)
    net = TinyNet(max_width=1.5)
    assert net.stem.weight.shape == (18, 3, 3, 3) and net.fc.weight.shape == (5, 36)
    x = torch.randn(3, 3, 8, 8)
    for sw in (sk.Switch([1.5]), sk.Switch([1.0]), sk.Switch([0.75, 0.75])):
        with sk.use_switch(net, sw):
            torch.testing.assert_close(net(x), ref_forward(net, x, sw, True))


@pytest.mark.parametrize("training", [True, False])
def test_forward_switches_equals_one_at_a_time(training):
    torch.manual_seed(2)
    net = TinyNet(max_width=1.25)
    sws = [sk.Switch([1.25]), sk.Switch([1.0]), sk.Switch([0.5, 0.5]), sk.Switch.parse("[4x0.25]x"),
           sk.Switch.ranges([(0.25, 0.75)])]
    register_switches(net, sws)
    x = torch.randn(4, 3, 8, 8)
    net.train()
    for _ in range(2):  # different statistics per row
        for sw in sws:
            with sk.use_switch(net, sw):
                net(torch.randn(4, 3, 8, 8) * (1 + sws.index(sw)))
    net.train(training)
    state0 = _snapshot(net)
    targets = torch.randint(0, 5, (4,))
    # one switch at a time
    alone = []
    for sw in sws:
        with sk.use_switch(net, sw):
            alone.append(net(x))
    sum(F.cross_entropy(o, targets) for o in alone).backward()
    g_alone = _grads(net)
    state_alone = _snapshot(net)
    net.load_state_dict(state0)
    net.zero_grad()
    # packed
    outs, feats = sk.forward_switches(net, x, sws, return_features=True)
    assert len(outs) == len(sws) and len(feats) == len(sws)
    for o, a in zip(outs, alone):
        torch.testing.assert_close(o, a)
    sum(F.cross_entropy(o, targets) for o in outs).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, g_alone[n], msg=n)
    for k, v in net.state_dict().items():  # running statistics updated identically
        if torch.is_tensor(v):
            torch.testing.assert_close(v, state_alone[k], msg=k)
    # features: zero-padded to the full width, equal to the hand-built ones
    net.load_state_dict(state0)
    for sw, f in zip(sws, feats):
        assert f.shape == (4, net.fc.in_full)
        _, ref_f = ref_forward(net, x, sw, training, return_features=True)
        torch.testing.assert_close(f, ref_f)
    # the net's own switch is untouched by forward_switches
    assert net.switch == sk.Switch([1.0])


def test_use_switch_restores_and_set_switch_chains():
    net = TinyNet()
    assert net.set_switch("[0.5, 0.5]x") is net
    with sk.use_switch(net, 0.25):
        assert net.switch == sk.Switch([0.25])
        with pytest.raises(RuntimeError, match="boom"):
            with net.use_switch(sk.Switch([1.0])):
                raise RuntimeError("boom")
        assert net.switch == sk.Switch([0.25])
    assert net.switch == sk.Switch([0.5, 0.5])
    sk.set_switch(net, sk.Switch([1.0]))
    assert net.switch == sk.Switch([1.0])


def test_bn_rows_are_per_switch_and_checkpointable():
    torch.manual_seed(3)
    net = TinyNet()
    a, b = sk.Switch([1.0]), sk.Switch([0.5, 0.5])
    net.train()
    with sk.use_switch(net, a):
        net(torch.randn(4, 3, 8, 8) + 3)
    assert net.switches == [a] and net.bn1.running_mean.shape == (1, 12)
    net.set_switch(b)  # registers a fresh row, not a copy of a's
    assert net.switches == [a, b]
    assert net.bn1.running_mean[1].abs().max() == 0 and (net.bn1.running_var[1] == 1).all()
    assert net.bn1.num_batches_tracked.tolist() == [1, 0]
    assert net.bn1.running_mean[0].abs().max() > 0
    net.eval()
    with pytest.warns(RuntimeWarning, match=r"\[0.5, 0.5\]x.*no BN statistics"):
        net(torch.randn(2, 3, 8, 8))
    # round trip into a fresh net (0 rows) through a weights-only save
    import io
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = TinyNet()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.switches == [a, b]
    torch.testing.assert_close(fresh.bn1.running_mean, net.bn1.running_mean)
    fresh.eval()
    net.set_switch(a)
    fresh.set_switch(a)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), net(x))


def test_calibrate_bn_digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    with torch.autocast("cpu", enabled=False):
        torch.set_default_dtype(torch.float32)
        try:
            net = TinyNet(c=8, classes=10, in_ch=1)
            opt = torch.optim.Adam(net.parameters(), lr=2e-2)
            trained = [sk.Switch([1.0]), sk.Switch([0.5])]
            net.train()
            for epoch in range(3):
                for i in range(0, 1500, 100):
                    outs = sk.forward_switches(net, x[i:i + 100], trained)
                    loss = sum(F.cross_entropy(o, y[i:i + 100]) for o in outs)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            new = sk.Switch([0.75])  # never trained: its rows are fresh
            net.register_switches([new])
            params = {k: v.clone() for k, v in net.named_parameters()}
            before_rows = net.bn2.running_mean.clone()
            net.eval()

            def acc(sw):
                with sk.use_switch(net, sw), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return (net(x[1500:]).argmax(1) == y[1500:]).float().mean().item()

            acc_before = {sw: acc(sw) for sw in trained + [new]}
            loader = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 1500, 100)]
            used = sk.calibrate_bn(net, loader, trained + [new], num_batches=10)
            assert used == 10
            assert not net.training and not net.bn1.training  # mode restored
            assert net.bn1.momentum == 0.1
            for k, v in net.named_parameters():  # weights and affine untouched
                assert torch.equal(v, params[k]), k
            row = net.bn2.switch_row(new)
            assert not torch.allclose(net.bn2.running_mean[row], before_rows[row])  # stats changed
            assert net.bn2.num_batches_tracked[row] == 10
            acc_after = {sw: acc(sw) for sw in trained + [new]}
            assert acc_after[new] >= acc_before[new] + 0.1, (acc_before, acc_after)
            for sw in trained:
                assert acc_after[sw] >= acc_before[sw] - 0.02, (sw, acc_before, acc_after)
        finally:
            torch.set_default_dtype(torch.float64)


def test_calibrate_is_cumulative_average():
    torch.manual_seed(4)
    bn = SlimBatchNorm1d(6)
    net = torch.nn.Sequential(SlimLinear(4, 6, slice_in=False), bn, SlimLinear(6, 3, slice_out=False))
    batches = [torch.randn(8, 4) * (i + 1) + i for i in range(4)]
    sw = sk.Switch([0.5])
    sk.calibrate_bn(net, batches, [sw], num_batches=3)
    r = bn.switch_row(sw)
    with torch.no_grad():
        hs = [F.linear(b, net[0].weight[:3], net[0].bias[:3]) for b in batches[:3]]
    torch.testing.assert_close(bn.running_mean[r, :3], torch.stack([h.mean(0) for h in hs]).mean(0))
    torch.testing.assert_close(bn.running_var[r, :3], torch.stack([h.var(0) for h in hs]).mean(0))
    assert (bn.running_var[r, 3:] == 1).all()


def test_parameter_ranges_extracts_the_sub_network():
    torch.manual_seed(5)
    net = TinyNet()
    sw = sk.Switch([0.5, 0.25, 0.25])
    net.set_switch(sw)
    pr = parameter_ranges(net, sw)
    sd = net.state_dict()
    assert set(pr) == {k for k in sd if torch.is_tensor(sd[k])}
    assert pr["stem.weight"][1] == (slice(6, 9), slice(0, 3), slice(None), slice(None))
    assert pr["dw.weight"][2] == (slice(9, 12), slice(None), slice(None), slice(None))
    assert pr["down.weight"][0] == (slice(0, 12), slice(0, 6), slice(None), slice(None))
    assert pr["fc.weight"][2] == (slice(0, 5), slice(18, 24))
    assert pr["fc.bias"] == [(slice(0, 5),)] * 3
    assert pr["bn1.running_mean"][1] == (slice(0, 1), slice(6, 9))
    # the windows are what the forward reads: zeroing everything outside them changes nothing
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = net(x)
        masked = {}
        for k, v in sd.items():
            if not torch.is_tensor(v) or not v.is_floating_point():
                masked[k] = v
                continue
            m = torch.zeros_like(v)
            for win in pr[k]:
                m[win] = v[win]
            masked[k] = m
        net.load_state_dict(masked)
        torch.testing.assert_close(net(x), ref)
    # an unregistered switch omits the statistics rows
    assert "bn1.running_mean" not in parameter_ranges(net, sk.Switch([0.25]))


def test_errors():
    with pytest.raises(ValueError, match="max_width must be a number >= 1.0"):
        SlimConv2d(3, 8, 3, max_width=0.5)
    with pytest.raises(ValueError, match="cannot be sliced"):
        SlimConv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="activation must be one of"):
        SwitchableBatchNorm2d(8, activation="gelu")
    net = TinyNet()
    with pytest.raises(ValueError, match=r"layer 'stem' \(SlimConv2d\).*above the net's max_width 1.0"):
        net.set_switch(sk.Switch([1.2]))
    assert net.switch == sk.Switch([1.0])  # nothing changed
    with pytest.raises(ValueError, match="has no channels"):
        net.set_switch(sk.Switch([0.9, 0.05, 0.05]))
    with pytest.raises(ValueError, match="missing the trailing 'x'"):
        net.set_switch("[0.5]")
    with pytest.raises(ValueError, match="expected 3 input channels"):
        net(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="no slimkern layers"):
        sk.set_switch(torch.nn.Linear(2, 2), sk.Switch([1.0]))
    with pytest.raises(ValueError, match="got a switch twice"):
        sk.forward_switches(net, torch.randn(2, 3, 8, 8), [sk.Switch([1.0]), "[1.0]x"])
    with pytest.raises(TypeError, match="list of switches"):
        sk.forward_switches(net, torch.randn(2, 3, 8, 8), sk.Switch([1.0]))
    with pytest.raises(ValueError, match="needs the layer's channel group, but the layer has none"):
        net.set_switch(sk.Switch.from_channels({"a": 4}))
    net.stem.out_group = "stem"
    with pytest.raises(ValueError, match="layer 'stem'.*no entry for channel group 'stem'"):
        net.set_switch(sk.Switch.from_channels({"a": 4}))
    with pytest.raises(ValueError, match="yielded no batch"):
        sk.calibrate_bn(net, [], [sk.Switch([1.0])])


def test_per_layer_switch_from_channels():
    torch.manual_seed(6)
    net = torch.nn.Sequential(
        SlimLinear(4, 8, slice_in=False, out_group="h1"), SlimBatchNorm1d(8, group="h1"), torch.nn.ReLU(),
        SlimLinear(8, 6, in_group="h1", out_group="h2"), torch.nn.ReLU(),
        SlimLinear(6, 3, slice_out=False, in_group="h2"))
    sw = sk.Switch.from_channels({"h1": (3, 2), "h2": (4, 1)})
    x = torch.randn(5, 4)
    net.train()
    out = sk.forward_switches(net, x, [sw])[0]
    ref = 0
    for (a, b), (c, d) in (((0, 3), (0, 4)), ((3, 5), (4, 5))):
        h = F.relu(F.batch_norm(F.linear(x, net[0].weight[a:b], net[0].bias[a:b]), None, None,
                                net[1].weight[a:b], net[1].bias[a:b], True))
        h = F.relu(F.linear(h, net[3].weight[c:d, a:b], net[3].bias[c:d]))
        ref = ref + F.linear(h, net[5].weight[:, c:d])
    torch.testing.assert_close(out, ref + net[5].bias)


def test_from_dense_reproduces_plain_layers():
    torch.manual_seed(7)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 16, 4))
    plain.train()
    plain(torch.randn(8, 3, 4, 4))  # non-trivial running stats
    plain.eval()
    slim = torch.nn.Sequential(
        SlimConv2d.from_dense(plain[0], max_width=1.5, slice_in=False),
        SwitchableBatchNorm2d.from_dense(plain[1], max_width=1.5), torch.nn.ReLU(),
        SlimConv2d.from_dense(plain[3], max_width=1.5))
    head = SlimLinear.from_dense(torch.nn.Linear(6, 4), max_width=1.5, slice_out=False)
    assert slim[0].weight.shape == (9, 3, 3, 3) and slim[1].switches == [sk.Switch([1.0])]
    slim.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(slim(x), plain[:4](x))
    torch.testing.assert_close(head(torch.ones(2, 6)), head.weight[:, :6].sum(1).expand(2, 4) + head.bias)
    with pytest.raises(TypeError, match="takes an nn.Conv2d"):
        SlimConv2d.from_dense(plain[1])


def test_calibrate_warns_for_unreached_bn():
    class Net(SlimNet):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(SlimLinear(4, 6, slice_in=False), SlimBatchNorm1d(6),
                                           SlimLinear(6, 3, slice_out=False))
            self.unused = SlimBatchNorm1d(6)

        def forward(self, x):
            return self.seq(x)

    net = Net()
    with pytest.warns(RuntimeWarning, match=r"not updated on every batch.*unused \[1.0\]x"):
        sk.calibrate_bn(net, [torch.randn(4, 4)], ["[1.0]x"])
    assert net.seq[1].num_batches_tracked.tolist() == [1]


def test_fallback_ops_match_slimkern_ops():
    from slimkern.nn import _fallback
    torch.manual_seed(8)
    w = torch.randn(8, 6, 3, 3, requires_grad=True)
    blocks = [(0, 3, 0, 4), (3, 6, 4, 8), (0, 6, 0, 8)]
    for x, offs in ((torch.randn(2, 12, 5, 5), None), (torch.randn(2, 6, 5, 5), [0, 0, 0])):
        a = _fallback.block_conv2d(x, w, None, blocks, offs, 1, 1)
        b = sk.ops.block_conv2d(x, w, None, blocks, offs, 1, 1)
        torch.testing.assert_close(a, b)
        ga, = torch.autograd.grad(a.square().sum(), w)
        gb, = torch.autograd.grad(b.square().sum(), w)
        torch.testing.assert_close(ga, gb)
    lw = torch.randn(5, 6)
    x = torch.randn(3, 9)
    torch.testing.assert_close(_fallback.block_linear(x, lw, None, [(0, 3, 0, 5), (0, 6, 0, 5)]),
                               sk.ops.block_linear(x, lw, None, [(0, 3, 0, 5), (0, 6, 0, 5)]))
