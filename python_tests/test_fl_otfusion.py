"""OT fusion (slimkern.fl.ot_fuse) against hand-built references: a randomly permuted copy of
a model computes the same function (checked on outputs), a Net2Net-widened copy (each neuron
duplicated, its outgoing weights halved) is what a rectangular plan must produce, and the
permutations themselves are known."""
import copy

import pytest
import torch
from torch import nn

from slimkern.fl.models import small_cnn
from slimkern.fl.ot_fusion import ot_fuse, ot_plans
from slimkern.models import mobilenet_v2, resnet20
from slimkern.nn._base import SlimModule
from slimkern.nn.batchnorm import _SwitchableBatchNorm


def _randomize_bn(net, g, shape):
    """Non-trivial BN affine and running statistics (fresh nets have gamma 1, beta 0)."""
    for m in net.modules():
        if isinstance(m, _SwitchableBatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    net.train()
    with torch.no_grad():
        net(torch.randn(16, *shape, generator=g))
    net.eval()
    return net


def _permute(net, g):
    """A copy of ``net`` with the channels of every width group randomly permuted (all layers
    of a group -- residual streams -- by the same permutation). Returns (copy, perms)."""
    net = copy.deepcopy(net)
    perms = {}

    def perm(group, n):
        if group not in perms:
            perms[group] = torch.randperm(n, generator=g)
        return perms[group]

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _SwitchableBatchNorm):
                p = perm(m.group, m.num_full)
                m.weight.copy_(m.weight[p])
                m.bias.copy_(m.bias[p])
                m.running_mean.copy_(m.running_mean[:, p])
                m.running_var.copy_(m.running_var[:, p])
            elif isinstance(m, SlimModule):
                w = m.weight
                if m.slice_out:
                    p = perm(m.out_group, w.shape[0])
                    w.copy_(w[p])
                    if m.bias is not None:
                        m.bias.copy_(m.bias[p])
                if m.slice_in and not getattr(m, "depthwise", False):
                    w.copy_(w[:, perm(m.in_group, w.shape[1])])
    return net, perms


def _out(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


NETS = {
    "resnet20": (lambda: resnet20(width_mult=0.5), (3, 16, 16)),
    "mobilenet_v2": (lambda: mobilenet_v2(width_mult=0.25), (3, 16, 16)),
}


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("method,reg", [("emd", 1e-2), ("sinkhorn", 1e-3)])
def test_permuted_copy_fuses_to_the_model(name, method, reg):
    build, shape = NETS[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = _randomize_bn(build(), g, shape)
    q, _ = _permute(net, g)
    x = torch.randn(8, *shape, generator=g)
    y = _out(net, x)
    torch.testing.assert_close(_out(q, x), y, atol=1e-5, rtol=0)  # the permutation keeps the function
    # vanilla averaging of the two (same function, different neuron order) breaks it: the test can fail
    naive = copy.deepcopy(net)
    with torch.no_grad():
        for p, a in zip(naive.parameters(), q.parameters()):
            p.copy_((p + a) / 2)
    assert (_out(naive, x) - y).abs().max() > 1e-2
    for target in (0, 1):
        fused = ot_fuse([net, q], target=target, method=method, reg=reg)
        torch.testing.assert_close(_out(fused, x), y, atol=1e-5, rtol=0)


def test_plans_are_identity_for_identical_models_and_recover_permutations():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = _randomize_bn(resnet20(width_mult=0.5), g, (3, 8, 8))
    for method, reg in (("emd", 1e-2), ("sinkhorn", 1e-3)):
        plans = ot_plans([net, copy.deepcopy(net)], method=method, reg=reg)
        for k in (0, 1):
            for grp, T in plans[k].items():
                n = T.shape[0]
                torch.testing.assert_close(T, torch.eye(n, dtype=T.dtype) / n, atol=1e-9, rtol=0)
    q, perms = _permute(net, g)
    plans = ot_plans([q], target=net)[0]
    assert set(plans) == set(perms)
    for grp, p in perms.items():
        n = len(p)
        # q's channel i is net's channel p[i]
        want = torch.zeros(n, n, dtype=torch.float64)
        want[torch.arange(n), p] = 1.0 / n
        torch.testing.assert_close(plans[grp], want, atol=1e-12, rtol=0)


def test_three_models_into_a_common_target_and_weights():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    net = _randomize_bn(resnet20(width_mult=0.25), g, (3, 8, 8))
    q1, _ = _permute(net, g)
    q2, _ = _permute(net, g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    fused = ot_fuse([q1, net, q2], weights=[1, 2, 3], target=q2)
    torch.testing.assert_close(_out(fused, x), _out(net, x), atol=1e-5, rtol=0)
    fused = ot_fuse([q1, net, q2], iters=2, method="sinkhorn", reg=1e-3)
    torch.testing.assert_close(_out(fused, x), _out(net, x), atol=1e-5, rtol=0)


def test_activation_ground_metric_recovers_a_permutation():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    net = _randomize_bn(resnet20(width_mult=0.5), g, (3, 8, 8))
    q, _ = _permute(net, g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    fused = ot_fuse([q, net], target=1, ground="activations", data=torch.randn(32, 3, 8, 8, generator=g))
    torch.testing.assert_close(_out(fused, x), _out(net, x), atol=1e-5, rtol=0)


class _PlainRes(nn.Module):
    """A plain (non-slim) model with a residual add: groups come from the fx analysis."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def test_plain_model_with_residual_and_biases():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    net = _PlainRes()
    net.train()
    with torch.no_grad():
        net.b1.weight.uniform_(0.5, 1.5, generator=g)
        net.b2.bias.normal_(0, 0.2, generator=g)
        net(torch.randn(16, 3, 6, 6, generator=g))
    net.eval()
    q = copy.deepcopy(net)
    p = torch.randperm(8, generator=g)  # one residual stream: c1, b1, c2, b2 and fc's input share it
    with torch.no_grad():
        for m in (q.c1, q.c2):
            m.weight.copy_(m.weight[p])
            m.bias.copy_(m.bias[p])
        q.c2.weight.copy_(q.c2.weight[:, p])
        for m in (q.b1, q.b2):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                t.copy_(t[p])
        q.fc.weight.copy_(q.fc.weight[:, p])
    x = torch.randn(4, 3, 6, 6, generator=g)
    torch.testing.assert_close(_out(q, x), _out(net, x), atol=1e-5, rtol=0)
    for method, reg in (("emd", 1e-2), ("sinkhorn", 1e-3)):
        torch.testing.assert_close(_out(ot_fuse([net, q], method=method, reg=reg), x), _out(net, x),
                                   atol=1e-5, rtol=0)


def _widen(small, wide):
    """Net2Net widening (Chen et al. 2016) by hand: wide channel j copies small channel j // 2;
    a layer's input weights of the two copies are halved, so ``wide`` computes ``small``."""
    with torch.no_grad():
        for (n, ms), mw in zip(small.named_modules(), wide.modules()):
            if isinstance(ms, _SwitchableBatchNorm):
                idx = torch.arange(mw.num_full) // 2
                for key in ("weight", "bias"):
                    getattr(mw, key).copy_(getattr(ms, key)[idx])
                mw.running_mean.copy_(ms.running_mean[:, idx])
                mw.running_var.copy_(ms.running_var[:, idx])
            elif isinstance(ms, SlimModule):
                w = ms.weight
                if ms.slice_out:
                    w = w[torch.arange(mw.weight.shape[0]) // 2]
                if ms.slice_in:
                    w = w[:, torch.arange(mw.weight.shape[1]) // 2] / 2
                mw.weight.copy_(w)
                if ms.bias is not None:
                    mw.bias.copy_(ms.bias if not ms.slice_out else ms.bias[torch.arange(mw.bias.shape[0]) // 2])
    return wide


def test_different_widths_rectangular_plans_split_and_merge():
    g = torch.Generator().manual_seed(5)
    small = _randomize_bn(small_cnn(10, 1, (4, 8, 6), seed=5), g, (1, 8, 8))
    wide = _widen(small, _randomize_bn(small_cnn(10, 1, (8, 16, 12), seed=6), g, (1, 8, 8)))
    x = torch.randn(6, 1, 8, 8, generator=g)
    torch.testing.assert_close(_out(wide, x), _out(small, x), atol=1e-5, rtol=0)  # the reference widening
    # small aligned into the wide basis is the widening (each neuron onto its two copies)
    to_wide = ot_fuse([small], target=wide)
    for a, b in zip(to_wide.parameters(), wide.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the wide one merged into the small basis is the small model again
    to_small = ot_fuse([wide], target=small)
    torch.testing.assert_close(_out(to_small, x), _out(small, x), atol=1e-5, rtol=0)
    # both together, either target width: the same function
    for target in (0, 1):
        fused = ot_fuse([small, wide], target=target, method="sinkhorn", reg=1e-3)
        torch.testing.assert_close(_out(fused, x), _out(small, x), atol=1e-4, rtol=0)


def test_bad_input_errors():
    a, b = resnet20(width_mult=0.25), mobilenet_v2(width_mult=0.25)
    with pytest.raises(ValueError, match="cannot be matched"):
        ot_fuse([a, b])
    with pytest.raises(ValueError, match="non-empty list"):
        ot_fuse([])
    with pytest.raises(ValueError, match="method"):
        ot_fuse([a, a], method="exact")
    with pytest.raises(ValueError, match="reg"):
        ot_fuse([a, a], method="sinkhorn", reg=0)
    with pytest.raises(ValueError, match="weights"):
        ot_fuse([a, a], weights=[1, -1])
    with pytest.raises(ValueError, match="2 models"):
        ot_fuse([a, a], weights=[1])
    with pytest.raises(ValueError, match="needs data"):
        ot_fuse([a, a], ground="activations")
    with pytest.raises(ValueError, match="cannot run on data"):
        ot_fuse([a, a], ground="activations", data=torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="target index"):
        ot_fuse([a, a], target=3)
    c1, c2 = small_cnn(10, 1, (4, 8, 6)), small_cnn(7, 1, (4, 8, 6))
    with pytest.raises(ValueError, match="fixed sides"):
        ot_fuse([c1, c2])
    with pytest.raises(ValueError, match="ground"):
        ot_fuse([c1, c1], ground="gradients")


# --------------------------------------------------------------------------- the otfusion rule


def _rule_setup(seed=7):
    from slimkern.fl.client import client_aggregator
    from slimkern.fl.rules.otfusion import OTFusion
    g = torch.Generator().manual_seed(seed)
    small = _randomize_bn(small_cnn(10, 1, (4, 8, 6), seed=seed), g, (1, 8, 8))
    wide = _widen(small, _randomize_bn(small_cnn(10, 1, (8, 16, 12), seed=seed + 1), g, (1, 8, 8)))
    agg = client_aggregator(wide)
    params = {n: p.detach().clone() for n, p in wide.named_parameters()}
    return OTFusion(model=wide), agg, params, small, wide, g


def _update(agg, cid, net_params, sw, n=10.0):
    from slimkern.fl.aggregate import ClientUpdate
    return ClientUpdate(cid, sw, agg.extract(net_params, sw), n)


def test_rule_aligns_a_narrow_client_into_the_global_basis_and_undoes_permutations():
    import slimkern as sk
    rule, agg, params, small, wide, g = _rule_setup()
    half, full = sk.Switch.width(0.5), sk.Switch.width(1.0)
    # the narrow client holds the small model in the prefix windows of its [0.5] switch
    holder = small_cnn(10, 1, (8, 16, 12))
    hp = {n: p.detach().clone() for n, p in holder.named_parameters()}
    for (n, p), (_, q) in zip(hp.items(), small.named_parameters()):
        p[tuple(slice(0, s) for s in q.shape)] = q.detach()
    new, rep = rule.aggregate(agg, params, [_update(agg, 1, hp, half)], {1: half}, None)
    assert rep.accepted == [1] and not rep.rejected
    for n in params:  # the global is the Net2Net widening of the small model: alignment reproduces it
        torch.testing.assert_close(new[n], params[n], atol=1e-6, rtol=0)
    # a full client sending a permuted copy of the global: OT undoes it, entry-wise FedAvg would not
    q, _ = _permute(wide, g)
    qp = {n: p.detach() for n, p in q.named_parameters()}
    new, rep = rule.aggregate(agg, params, [_update(agg, 2, qp, full)], {2: full}, None)
    for n in params:
        torch.testing.assert_close(new[n], params[n], atol=1e-6, rtol=0)
    assert any((qp[n] - params[n]).abs().max() > 1e-3 for n in params)


def test_rule_rejects_bad_replies_with_reasons():
    import slimkern as sk
    from slimkern.fl.aggregate import ClientUpdate
    rule, agg, params, small, wide, g = _rule_setup()
    full = sk.Switch.width(1.0)
    good = _update(agg, 1, params, full)
    nan = ClientUpdate(2, full, torch.full_like(good.values, float("nan")), 5.0)
    short = ClientUpdate(3, full, good.values[:-1], 5.0)
    offset = ClientUpdate(4, sk.Switch.ranges([(0.5, 1.0)]), torch.zeros(3), 5.0)
    logged = []
    new, rep = rule.aggregate(agg, params, [good, nan, short, offset],
                              {1: full, 2: full, 3: full, 4: offset.switch}, logged.append)
    assert rep.accepted == [1]
    reasons = dict(rep.rejected)
    assert set(reasons) == {2, 3, 4} and "finite" in reasons[2] and "values sent" in reasons[3]
    assert len(logged) == 3
    for n in params:
        torch.testing.assert_close(new[n], params[n], atol=1e-6, rtol=0)
    from slimkern.fl.rules.otfusion import OTFusion
    with pytest.raises(ValueError, match="width groups"):
        OTFusion().aggregate(agg, params, [good], {1: full}, None)
    with pytest.raises(ValueError, match="method"):
        OTFusion(method="exact")


def test_rule_runs_in_simulate_by_name():
    from slimkern.fl import make_clients, parse_tiers, simulate
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(120, 1, 8, 8, generator=g), torch.arange(120) % 4
    clients = make_clients(Y.numpy(), parse_tiers("1.0:0.5,0.5:0.5"), 4, "iid", seed=0)
    hist = simulate(small_cnn(4, 1, (8, 16, 8), seed=0), (X, Y), (X[:40], Y[:40]), clients, "otfusion", rounds=2,
                    local_epochs=1, batch_size=16, progress=False, calib_set=(X[:40], Y[:40]))
    assert len(hist.rounds) == 2 and sorted(hist.rounds[-1].accepted) == [0, 1, 2, 3]
    assert set(hist.last_accuracy()) == {"[1.0]x", "[0.5]x"}


def test_rule_prefix_mode_undoes_a_permutation_inside_the_prefix():
    import slimkern as sk
    from slimkern.fl.rules.otfusion import OTFusion
    _, agg, params, small, wide, g = _rule_setup(9)
    rule = OTFusion(model=wide, mode="prefix")
    half = sk.Switch.width(0.5)
    # the client sends the global's [0.5] sub-network with its neurons permuted within the prefix
    sub = small_cnn(10, 1, (4, 8, 6))
    with torch.no_grad():
        for (n, p), q in zip(sub.named_parameters(), wide.parameters()):
            p.copy_(q[tuple(slice(0, s) for s in p.shape)])
    perm, _ = _permute(sub, g)
    hp = {n: p.detach().clone() for n, p in wide.named_parameters()}
    for (n, p), (_, q) in zip(hp.items(), perm.named_parameters()):
        p[tuple(slice(0, s) for s in q.shape)] = q.detach()
    assert any((hp[n] - params[n]).abs().max() > 1e-3 for n in params)
    new, rep = rule.aggregate(agg, params, [_update(agg, 1, hp, half)], {1: half}, None)
    assert rep.accepted == [1]
    for n in params:
        torch.testing.assert_close(new[n], params[n], atol=1e-6, rtol=0)
    # the full mode splits the same narrow reply over the whole width instead: the model changes
    full_new, _ = OTFusion(model=wide).aggregate(agg, params, [_update(agg, 1, hp, half)], {1: half}, None)
    assert any((full_new[n] - params[n]).abs().max() > 1e-3 for n in params)
    with pytest.raises(ValueError, match="mode"):
        OTFusion(mode="square")
