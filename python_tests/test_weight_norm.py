"""SlimWNConv2d against torch.nn.utils.parametrizations.weight_norm on hand-built sub-networks."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

import slimkern
from slimkern.nn import SlimWNConv2d


def _plain_wn(m: SlimWNConv2d, in_rng, out_rng, bias=True, g_scale=None):
    """A torch weight-normed conv holding g[out] and v[out, in] of ``m`` (independent reference)."""
    (i0, i1), (o0, o1) = in_rng, out_rng
    c = nn.Conv2d(i1 - i0, o1 - o0, m.kernel_size, m.stride, m.padding, m.dilation, bias=bias)
    c = weight_norm(c, dim=0)
    with torch.no_grad():
        c.parametrizations.weight.original1.copy_(m.weight_v[o0:o1, i0:i1])
        c.parametrizations.weight.original0.copy_(m.weight_g[o0:o1].view(-1, 1, 1, 1))
        if bias:
            c.bias.copy_(m.bias[o0:o1])
    return c


def _grads(mod):
    return {n: p.grad.clone() for n, p in mod.named_parameters()}


@pytest.mark.parametrize("max_width", [1.0, 1.5])
def test_full_switch_equals_torch_weight_norm_with_grads(max_width):
    torch.manual_seed(0)
    m = SlimWNConv2d(6, 8, 3, padding=1, max_width=max_width)
    ref = _plain_wn(m, (0, 6), (0, 8))
    x = torch.randn(2, 6, 7, 7)
    xr = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    y = m(xs)
    yr = ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(y)
    y.backward(go)
    yr.backward(go)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    g = _grads(ref)
    torch.testing.assert_close(m.weight_v.grad[:8, :6], g["parametrizations.weight.original1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.weight_g.grad[:8], g["parametrizations.weight.original0"].flatten(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bias.grad[:8], g["bias"], rtol=1e-5, atol=1e-6)
    if max_width > 1:  # the wide part is not read by [1.0]
        assert m.weight_v.grad[8:].abs().sum() == 0 and m.weight_v.grad[:, 6:].abs().sum() == 0


def test_init_makes_base_switch_the_plain_conv():
    torch.manual_seed(1)
    m = SlimWNConv2d(4, 5, 3, padding=1, max_width=1.2)
    x = torch.randn(1, 4, 5, 5)
    w = m.weight_v[:5, :4]
    torch.testing.assert_close(m(x), nn.functional.conv2d(x, w, m.bias[:5], padding=1), rtol=1e-5, atol=1e-6)


def test_paradis_blocks_are_independent_weight_normed_convs_with_grads():
    """[0.5, 0.25, 0.25] on an inner layer: branch b is a weight-normed conv over its own
    inputs I_b (norm over I_b only), outputs concatenated."""
    torch.manual_seed(2)
    m = SlimWNConv2d(8, 12, 3, padding=1, max_width=1.0)
    sw = slimkern.Switch([0.5, 0.25, 0.25])
    ins, outs = m.in_ranges(sw), m.out_ranges(sw)
    assert ins == [(0, 4), (4, 6), (6, 8)] and outs == [(0, 6), (6, 9), (9, 12)]
    refs = [_plain_wn(m, i, o) for i, o in zip(ins, outs)]
    x = torch.randn(3, 8, 6, 6)
    xs = x.clone().requires_grad_(True)
    with slimkern.use_switch(m, sw):
        y = m(xs)
    xr = [x[:, a:b].clone().requires_grad_(True) for a, b in ins]
    yr = torch.cat([r(xi) for r, xi in zip(refs, xr)], 1)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(y)
    y.backward(go)
    yr.backward(go)
    torch.testing.assert_close(xs.grad, torch.cat([t.grad for t in xr], 1), rtol=1e-5, atol=1e-6)
    for r, (i0, i1), (o0, o1) in zip(refs, ins, outs):
        g = _grads(r)
        torch.testing.assert_close(m.weight_v.grad[o0:o1, i0:i1], g["parametrizations.weight.original1"],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.weight_g.grad[o0:o1], g["parametrizations.weight.original0"].flatten(),
                                   rtol=1e-5, atol=1e-6)
    # off-diagonal blocks are read by nobody
    assert m.weight_v.grad[0:6, 4:8].abs().sum() == 0


def test_unsliced_input_norm_runs_over_the_whole_image():
    torch.manual_seed(3)
    m = SlimWNConv2d(3, 8, 3, padding=1, slice_in=False)
    sw = slimkern.Switch([0.5, 0.5])
    x = torch.randn(2, 3, 5, 5)
    with slimkern.use_switch(m, sw):
        y = m(x)
    ref = torch.cat([_plain_wn(m, (0, 3), o)(x) for o in m.out_ranges(sw)], 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_fused_layer_equals_weight_normed_conv_on_concatenated_features_with_grads():
    """Fused (sliced in, not out): sum of the branches' partial outputs + bias once equals one
    weight-normed conv over the switch's whole input (norm over the union of branch inputs)."""
    torch.manual_seed(4)
    m = SlimWNConv2d(8, 12, 3, padding=1, slice_out=False, max_width=1.5)
    sws = [slimkern.Switch([1.0]), slimkern.Switch([0.5, 0.5]), slimkern.Switch([4 * [0.25]][0])]
    x = torch.randn(2, 8, 5, 5)
    for sw in sws:
        m.zero_grad(set_to_none=True)
        cin = m.in_ranges(sw)[-1][1]
        ref = _plain_wn(m, (0, cin), (0, 12))
        xs = x.clone().requires_grad_(True)
        with slimkern.use_switch(m, sw):
            y = m(xs)
        xr = x.clone().requires_grad_(True)
        yr = ref(xr)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        go = torch.randn_like(y)
        y.backward(go)
        yr.backward(go)
        g = _grads(ref)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.weight_v.grad[:, :cin], g["parametrizations.weight.original1"],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.weight_g.grad, g["parametrizations.weight.original0"].flatten(),
                                   rtol=1e-5, atol=1e-6)


def test_packed_pass_equals_switches_alone():
    torch.manual_seed(5)
    inner = SlimWNConv2d(3, 8, 3, padding=1, slice_in=False)
    fused = SlimWNConv2d(8, 4, 3, padding=1, slice_out=False)
    net = slimkern.nn.SlimNet()
    net.a, net.b = inner, fused
    net.forward = lambda x: net.b(torch.relu(net.a(x)))
    sws = [slimkern.Switch([1.0]), slimkern.Switch([0.5, 0.5]), slimkern.Switch([0.25] * 4)]
    x = torch.randn(2, 3, 6, 6)
    packed = slimkern.forward_switches(net, x, sws)
    for sw, y in zip(sws, packed):
        with slimkern.use_switch(net, sw):
            torch.testing.assert_close(y, net(x), rtol=1e-5, atol=1e-6)


def test_from_dense_copies_torch_weight_norm():
    torch.manual_seed(6)
    c = weight_norm(nn.Conv2d(4, 6, 3, padding=1), dim=0)
    with torch.no_grad():
        c.parametrizations.weight.original0.mul_(1.7)  # g != ||v||
    m = SlimWNConv2d.from_dense(c, max_width=1.5)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(m(x), c(x), rtol=1e-5, atol=1e-6)


def test_reference_detects_a_wrong_norm():
    """The comparison can fail: normalising over the full allocated input breaks it."""
    torch.manual_seed(7)
    m = SlimWNConv2d(8, 8, 3, padding=1)
    sw = slimkern.Switch([0.5])
    x = torch.randn(1, 4, 5, 5)
    wrong = m.effective_weight((0, 4), (0, 4), norm_ranges=[(0, 8)])
    with slimkern.use_switch(m, sw):
        y = m(x)
    bad = nn.functional.conv2d(x, wrong, m.bias[:4], padding=1)
    assert not torch.allclose(y, bad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y, _plain_wn(m, (0, 4), (0, 4))(x), rtol=1e-5, atol=1e-6)


def test_argument_validation():
    with pytest.raises(ValueError, match="padding"):
        SlimWNConv2d(3, 4, 3, padding="same")
    with pytest.raises(ValueError, match="4-d"):
        SlimWNConv2d(3, 4, 3)(torch.randn(3, 5, 5))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SlimWNConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="input channels"):
        SlimWNConv2d(3, 4, 3)(torch.randn(1, 5, 5, 5))
    with pytest.raises(ValueError, match="outside"):
        SlimWNConv2d(3, 4, 3).effective_weight((0, 9), (0, 4))
