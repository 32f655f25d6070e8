"""WDSR through slimkern.export / profile / parameter_ranges / ParallelDeployment.

References: the hand-built plain WDSR of torch layers under ``parametrizations.weight_norm``
(``wdsr_reference``), the packed ``forward_switches`` pass, hook counts of the hand-built
network's convs and hand-computed channel ranges."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

import slimkern
from slimkern.export import save
from slimkern.models import build
from slimkern.nn import parameter_ranges
from wdsr_reference import PlainWDSRTrunk, _wn, plain_forward

SWITCHES = [[1.0], [0.5, 0.5], [0.25] * 4]


def _net(seed=0):
    torch.manual_seed(seed)
    n = build("wdsr", max_width=1.25, width_mult=0.25, n_blocks=2)  # 16 features, 64 wide
    with torch.no_grad():  # g away from ||v|| so the norm matters
        for p in n.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return n.eval()


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.mark.parametrize("k", range(len(SWITCHES)))
def test_export_equals_packed_pass_and_hand_built_wdsr(net, k):
    x = torch.rand(2, 3, 7, 6)
    sw = slimkern.Switch(SWITCHES[k])
    dep = slimkern.export(net, sw)
    with torch.no_grad():
        out = dep(x)
        packed = slimkern.forward_switches(net, x, SWITCHES)[k]
        hand = plain_forward(net, sw, x)
    assert out.shape == (2, 3, 14, 12)
    torch.testing.assert_close(out, packed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-5)
    assert len(dep.branches) == sw.num_branches
    for m in list(dep.branches.modules()) + list(dep.fusion.modules()):  # plain layers, weight norm folded
        assert not hasattr(m, "parametrizations") and type(m).__module__.split(".")[0] != "slimkern"
    assert isinstance(dep.fusion.skip, nn.Conv2d) and dep.fusion.skip.weight.shape == (12, 3, 5, 5)
    assert torch.equal(dep.bias, net.tail.bias.detach())


def test_fold_bn_flag_is_harmless_without_bn(net):
    x = torch.rand(1, 3, 5, 5)
    a, b = slimkern.export(net, [0.5, 0.5]), slimkern.export(net, [0.5, 0.5], fold_bn=True)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_branch_is_the_hand_built_trunk_and_partial_tail(net):
    """Branch 1 of [0.5, 0.5]: the plain weight-normed trunk on features [8, 16) (mids [32, 64)),
    then the tail's columns [8, 16) of the weight normalised over the union [0, 16), no bias."""
    sw = slimkern.Switch([0.5, 0.5])
    dep = slimkern.export(net, sw)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        trunk = PlainWDSRTrunk(net, (8, 16), [(32, 64)] * 2)
        tail = _wn(net.tail, (0, 12), (0, 16))  # torch's weight_norm over the union
        ref = F.conv2d(trunk(x - net.rgb_mean), tail.weight[:, 8:16], padding=1)
        torch.testing.assert_close(dep.branches[1](x), ref, rtol=1e-5, atol=1e-6)
        # each branch conv holds g v / ||v|| over its own inputs, as torch's weight_norm computes it
        torch.testing.assert_close(dep.branches[1].head.weight, trunk.head.weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(getattr(dep.branches[1].body, "1").conv2.weight, trunk.c2[1].weight,
                                   rtol=1e-6, atol=0)


def test_weights_only_and_torch_export_roundtrip(net, tmp_path):
    sw = slimkern.Switch([0.5, 0.5])
    dep = slimkern.export(net, sw)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        ref = dep(x)
    save(dep, tmp_path, x)
    x3 = torch.rand(3, 3, 6, 6)  # a batch size the program was not traced with
    with torch.no_grad():
        prog = torch.export.load(str(tmp_path / "deployable.pt2")).module()
        torch.testing.assert_close(prog(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(prog(x3), dep(x3), rtol=1e-5, atol=1e-6)
        parts = [torch.export.load(str(tmp_path / f"branch{i}.pt2")).module()(x) for i in range(2)]
        fusion = torch.export.load(str(tmp_path / "fusion.pt2")).module()
        y = fusion(x, parts[0] + parts[1] + dep.bias.view(1, -1, 1, 1))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # weights alone: loaded with weights_only into the export of another net
    sd = torch.load(tmp_path / "deployable.state_dict.pt", weights_only=True)
    other = slimkern.export(_net(seed=3), sw)
    with torch.no_grad():
        assert not torch.allclose(other(x), ref)
        other.load_state_dict(sd)
        torch.testing.assert_close(other(x), ref, rtol=0, atol=0)


def _hook_macs(net, sw, h, w):
    counted = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: counted.append(o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        if isinstance(m, nn.Conv2d) else None)
    try:
        with torch.no_grad():
            plain_forward(net, sw, torch.rand(1, 3, h, w))
    finally:
        handle.remove()
    return sum(counted)


@pytest.mark.parametrize("sw", SWITCHES)
def test_profile_equals_branch_macs_and_hook_counts(net, sw):
    h, w = 7, 6
    sw = slimkern.Switch(sw)
    prof = slimkern.profile(net, sw, (1, 3, h, w))
    ref = net.branch_macs(sw, h, w)
    assert prof.macs == ref["total"] == _hook_macs(net, sw, h, w)
    assert [b.macs for b in prof.branches] == ref["branches"]
    assert prof.fusion_macs == ref["fusion"] == h * w * 12 * 3 * 25
    assert prof.max_device_macs == ref["max_device"]
    dep = slimkern.export(net, sw)
    assert prof.params == sum(p.numel() for p in dep.parameters())
    assert [b.params for b in prof.branches] == [sum(p.numel() for p in b.parameters()) for b in dep.branches]
    assert prof.fusion.output_shape == (1, 3, 2 * h, 2 * w)
    assert "fusion" in str(prof) and prof.as_dict()["fusion_macs"] == ref["fusion"]


def test_parameter_ranges_hand_computed(net):
    """[0.5, 0.5] at 16 features / 64 wide activations: features [0, 8) | [8, 16), mids
    [0, 32) | [32, 64); the image and the 12 tail/skip outputs are never sliced."""
    pr = parameter_ranges(net, [0.5, 0.5])
    full = slice(None)
    f, m = [slice(0, 8), slice(8, 16)], [slice(0, 32), slice(32, 64)]
    assert pr["head.weight_v"] == [(f[b], slice(0, 3), full, full) for b in range(2)]
    assert pr["head.weight_g"] == pr["head.bias"] == [(f[b],) for b in range(2)]
    assert pr["body.1.conv1.weight_v"] == [(m[b], f[b], full, full) for b in range(2)]
    assert pr["body.1.conv2.weight_v"] == [(f[b], m[b], full, full) for b in range(2)]
    assert pr["tail.weight_v"] == [(slice(0, 12), f[b], full, full) for b in range(2)]
    assert pr["tail.weight_g"] == pr["tail.bias"] == [(slice(0, 12),)] * 2
    assert pr["skip.weight_v"] == [(slice(0, 12), slice(0, 3), full, full)] * 2
    assert set(pr) == {n for n, _ in net.named_parameters()} | {"rgb_mean"}
    sd = net.state_dict()
    for name, wins in pr.items():
        for win in wins:
            sd[name][win]  # every window indexes its tensor


def test_epilogue_reading_a_branch_is_refused():
    """After the fused tail, reading the sliced features is not a function of the sum."""
    class Leaky(type(_net())):
        def forward(self, x):
            h = self.body(self.head(x))
            return self.tail(h) + h[:, :1].mean()

    n = Leaky(n_feats=16, n_blocks=1)
    with pytest.raises(ValueError, match="depends on a branch's own channels"):
        slimkern.export(n, [0.5, 0.5])
    with pytest.raises(ValueError, match="depends on a branch's own channels"):
        slimkern.profile(n, [0.5, 0.5], (1, 3, 4, 4))


@pytest.mark.slow
def test_parallel_deployment_equals_the_export(net):
    from slimkern.deploy import ParallelDeployment

    dep = slimkern.export(net, [0.5, 0.5])
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        ref = dep(x)
    with ParallelDeployment(dep) as par:
        pids = par.pids
        y = par(x)
    assert torch.equal(y, ref)
    import os
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
