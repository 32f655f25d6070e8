"""Slim WDSR against a plain WDSR of torch layers (nn.Conv2d under parametrizations.weight_norm)."""
import pytest
import torch
import torch.nn as nn

import slimkern
from slimkern.models import build
from slimkern.models.wdsr import WDSR
from wdsr_reference import plain_forward


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = build("wdsr", max_width=1.25, width_mult=0.25, n_blocks=2)  # 16 features, 64 wide
    with torch.no_grad():  # g away from ||v|| so the norm matters
        for p in n.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return n


def test_build_geometry(net):
    assert net.feats == 16 and net.head.out_full == 20 and net.body[0].conv1.out_full == 80
    assert net.tail.out_full == 12 and net.skip.out_full == 12
    x = torch.rand(2, 3, 6, 7)
    assert net(x).shape == (2, 3, 12, 14)


def test_full_switch_equals_plain_wdsr(net):
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(net(x), plain_forward(net, [1.0], x), rtol=1e-5, atol=1e-5)


def test_default_paper_size_equals_plain_wdsr():
    torch.manual_seed(1)
    n = build("wdsr")  # 64 features, 8 blocks, expansion 4
    assert n.feats == 64 and len(n.body) == 8 and n.body[0].conv1.out_channels == 256
    x = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(n(x), plain_forward(n, [1.0], x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sw", [[0.5, 0.5], [0.25] * 4, [0.5, 0.25, 0.25], [1.25], [0.5]])
def test_switches_equal_hand_built_sub_networks(net, sw):
    x = torch.rand(2, 3, 7, 6)
    with slimkern.use_switch(net, slimkern.Switch(sw)):
        y = net(x)
    torch.testing.assert_close(y, plain_forward(net, sw, x), rtol=1e-5, atol=1e-5)


def test_packed_pass_equals_each_switch_with_grads(net):
    sws = [slimkern.Switch([1.0]), slimkern.Switch([0.5, 0.5]), slimkern.Switch([0.25] * 4)]
    x = torch.rand(2, 3, 6, 6)
    net.zero_grad(set_to_none=True)
    outs = slimkern.forward_switches(net, x, sws)
    sum(o.square().mean() for o in outs).backward()
    packed = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    for sw, y in zip(sws, outs):
        with slimkern.use_switch(net, sw):
            z = net(x)
        torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-6)
        z.square().mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_features_of_the_fused_tail(net):
    x = torch.rand(1, 3, 5, 5)
    outs, feats = slimkern.forward_switches(net, x, [[1.0], [0.5, 0.5]], return_features=True)
    assert feats[0].shape == (1, 20, 5, 5) and feats[1][:, 16:].abs().sum() == 0


def test_branch_macs_equal_hook_count_on_the_plain_network(net):
    """Closed-form MACs vs counting every nn.Conv2d of the hand-built network with hooks."""
    h, w = 7, 6
    for sw in ([1.0], [0.5, 0.5], [0.25] * 4):
        counted = []

        def hook(mod, inp, out):
            counted.append(out.numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1])

        handles = nn.modules.module.register_module_forward_hook(
            lambda mod, i, o: hook(mod, i, o) if isinstance(mod, nn.Conv2d) else None)
        try:
            plain_forward(net, sw, torch.rand(1, 3, h, w))
        finally:
            handles.remove()
        m = net.branch_macs(slimkern.Switch(sw), h, w)
        assert m["total"] == sum(counted)
        assert m["fusion"] == h * w * 12 * 3 * 25
        assert len(set(m["branches"])) == 1 and m["max_device"] == m["branches"][0] + m["fusion"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="n_blocks"):
        build("wdsr", n_blocks=0)
    with pytest.raises(ValueError, match="rgb_mean"):
        WDSR(in_channels=1)
    with pytest.raises(ValueError, match="positive ints"):
        build("wdsr", width_mult=0.25, n_blocks=1).branch_macs("[1.0]x", 0, 4)


def test_bicubic_init_starts_as_bicubic_upsampling():
    from slimkern.data.images import bicubic_up

    torch.manual_seed(3)
    n = build("wdsr", width_mult=0.25, n_blocks=1, init="bicubic")
    x = torch.rand(2, 3, 12, 10)
    ref = nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    for sw in ([1.0], [0.5, 0.5]):
        with slimkern.use_switch(n, slimkern.Switch(sw)):
            y = n(x)
        torch.testing.assert_close(y[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(build("wdsr", width_mult=0.25, n_blocks=1)(x)[..., 4:-4, 4:-4],
                              bicubic_up(x, 2)[..., 4:-4, 4:-4], atol=1e-2)
    for s in (3, 4):
        from slimkern.models.wdsr import bicubic_skip_kernel
        k = bicubic_skip_kernel(s, 1)
        y = nn.functional.pixel_shuffle(nn.functional.conv2d(x[:, :1], k, padding=2), s)
        r = nn.functional.interpolate(x[:, :1], scale_factor=s, mode="bicubic", align_corners=False)
        torch.testing.assert_close(y[..., 3 * s:-3 * s, 3 * s:-3 * s], r[..., 3 * s:-3 * s, 3 * s:-3 * s],
                                   rtol=1e-5, atol=1e-5)
