"""DAC gates, Algorithm 1 with its guard, budgets: compressed == gated masked net, budgets met."""
import pytest
import torch

import slimkern as sk
from slimkern.prune import DACState, DepthwiseGates, channel_groups, dac_compress, parse_budgets, pruned_profile

pytestmark = pytest.mark.usefixtures("exact_fp32")
SIZE = (1, 3, 8, 8)


def _net(seed=0):
    torch.manual_seed(seed)
    net = sk.models.mobilenet_v2(width_mult=0.25, last_channels=32)
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, sk.nn.SwitchableBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for _ in range(2):
            net(torch.randn(8, 3, 8, 8))
    return net.eval()


def _loader(n_batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n_batches)]


def test_gates_on_every_inverted_residual_depthwise_input():
    net = _net()
    gates = DepthwiseGates(net)
    dws = [n for n, m in net.named_modules() if isinstance(m, sk.nn.SlimConv2d) and m.depthwise]
    assert len(dws) == 17 and sorted(sum(gates.depthwise.values(), [])) == sorted(dws)
    assert all(torch.equal(w.detach(), torch.ones_like(w)) for w in gates.as_list())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        with gates.attach(net):
            torch.testing.assert_close(net(x), ref)  # gates of 1 change nothing
        gates.gates[3].data[:] = 0.0
        dw = net.get_submodule(gates.depthwise[gates.names[3]][0])
        seen = []
        h = dw.register_forward_hook(lambda m, a, o: seen.append(o.abs().max().item()))
        with gates.attach(net):
            net(x)
        net(x)
        h.remove()
        assert seen[0] == 0.0 and seen[1] > 1e-2  # a zero gate silences the depthwise conv; hooks removed on exit
        assert torch.equal(net(x), ref)


def test_gate_multiplies_depthwise_input_hand_check():
    net = _net()
    gates = DepthwiseGates(net)
    j = gates.names.index("s2b1.hidden")
    w = torch.rand(gates.gates[j].numel())
    gates.gates[j].data.copy_(w)
    seen = {}
    dw = net.get_submodule(gates.depthwise["s2b1.hidden"][0])
    h = dw.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.clone()))
    expand_bn = net.get_submodule("features.3.conv.1")
    h2 = expand_bn.register_forward_hook(lambda m, a, o: seen.setdefault("raw", o.clone()))
    with torch.no_grad(), gates.attach(net):
        net(torch.randn(2, 3, 8, 8))
    h.remove(), h2.remove()
    c = w.numel()
    ref = torch.nn.functional.conv2d(seen["raw"] * w.view(1, -1, 1, 1), dw.weight[:c], None, dw.stride, dw.padding,
                                     groups=c)
    torch.testing.assert_close(seen["out"], ref, rtol=1e-5, atol=1e-6)


def test_compressed_equals_gated_masked_net():
    st = DACState(_net())
    g = torch.Generator().manual_seed(0)
    for w, a in zip(st.gates.as_list(), st.alive.values()):
        w.data.copy_(torch.rand(w.shape, generator=g))
        a.copy_((torch.rand(a.shape, generator=g) > 0.4).float())
        a[0] = 1
    x = torch.randn(3, 3, 8, 8)
    comp = st.compressed()
    with torch.no_grad():
        torch.testing.assert_close(comp(x), st(x), rtol=1e-4, atol=1e-5)
    a = sk.profile(comp, input_size=SIZE)
    b = pruned_profile(st.net, st.keep(), SIZE)
    assert (a.macs, a.params, a.peak_activation_bytes) == (b.macs, b.params, b.peak_activation_bytes)


def test_remove_below_threshold_hand_case():
    st = DACState(_net())
    j = st.gates.names.index("s1") if "s1" in st.gates.names else 0
    name = st.gates.names[j]
    w = st.gates.gates[j]
    c = w.numel()
    vals = torch.full((c,), 0.9)
    vals[0], vals[2] = 0.05, 0.1  # <= 0.1: removed
    w.data.copy_(vals)
    assert st.remove_below(0.1) == 2
    assert st.alive[name].tolist() == [0.0, 1.0, 0.0] + [1.0] * (c - 3)
    w.data.fill_(0.01)  # all below: the largest live gate survives
    w.data[4] = 0.02
    st.remove_below(0.1)
    assert st.alive[name].nonzero().flatten().tolist() == [4]


def test_budget_parsing_and_errors():
    b = parse_budgets([{"macs": 100, "params": 50}, {"params": 10}], 1000, 500)
    assert (b[0].macs, b[0].params, b[1].macs, b[1].params) == (100, 50, None, 10)
    r = parse_budgets([{"macs_ratio": 0.5}], 1000, 500)[0]
    assert (r.macs, r.params) == (500, None)
    assert r.met(499, 10**9) and not r.met(500, 0)  # Algorithm 1 loops while MACs >= M
    for bad, err, match in [([{"macs": -5}], ValueError, "> 0"), ([{"macs": 0}], ValueError, "> 0"),
                            ([{"macs": 100, "params_ratio": 0.5}], ValueError, "mixes units"),
                            ([{"macs": 100}, {"macs_ratio": 0.5}], ValueError, "mix units"),
                            ([{"macs_ratio": 1.5}], ValueError, r"\(0, 1\]"), ([{"flops": 3}], ValueError, "unknown"),
                            ({"macs": 3}, TypeError, "list"), ([{"macs": "1e6"}], TypeError, "number"),
                            ([{}], TypeError, "non-empty")]:
        with pytest.raises(err, match=match):
            parse_budgets(bad, 1000, 500)


def test_budget_below_smallest_reachable_model_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="below the smallest reachable model"):
        dac_compress(net, [{"macs": 1000}], _loader(), input_size=SIZE)
    with pytest.raises(ValueError, match="mixes units"):
        dac_compress(net, [{"macs": 1000, "params_ratio": 0.3}], _loader(), input_size=SIZE)
    with pytest.raises(ValueError, match="> 0"):
        dac_compress(net, [{"params": -1}], _loader(), input_size=SIZE)


def test_algorithm1_meets_every_budget_with_real_models():
    net = _net()
    full = sk.profile(net, input_size=SIZE)
    budgets = [{"macs_ratio": 0.8}, {"macs_ratio": 0.9, "params_ratio": 0.95}]
    res = dac_compress(net, budgets, _loader(1), input_size=SIZE, guard_fraction=0.6, finetune_epochs=0)
    assert [r.budget.macs for r in res] == [0.8 * full.macs, 0.9 * full.macs]
    x = torch.randn(2, 3, 8, 8)
    for r in res:
        p = sk.profile(r.model, input_size=SIZE)
        assert (p.macs, p.params, p.peak_activation_bytes) == (r.macs, r.params, r.peak_activation_bytes)
        assert r.budget.met(p.macs, p.params)
        assert not any(isinstance(m, sk.nn.SlimConv2d) for m in r.model.modules())
        assert r.model(x).shape == (2, 10)
        assert r.rounds == len(r.history)
    assert res[0].macs < res[1].macs  # tighter budget, smaller model
    assert all(h["removed"] >= 1 for r in res for h in r.history)  # the guard keeps every round productive
    assert any(h["by"].startswith("guard:") for r in res for h in r.history)
    assert net.training is False and sk.profile(net, input_size=SIZE).macs == full.macs  # input unchanged


def test_guard_picks_the_most_expensive_block_and_max_rounds_errors():
    net = _net()
    st = DACState(net)
    prof = pruned_profile(net, {}, SIZE)
    res = dac_compress(net, [{"macs_ratio": 0.97}], _loader(1), input_size=SIZE, threshold=0.0,
                       guard_fraction=0.1, finetune_epochs=0, gate_lr=1e-6)
    first = res[0].history[0]["by"].split(":", 1)[1]
    per_layer = {lc.name: lc.macs for lc in prof.branches[0].layers}
    cost = {n: sum(per_layer[m] for m in st.groups[n].producers + st.groups[n].depthwise + st.groups[n].consumers)
            for n in st.gates.names}
    assert first == max(cost, key=cost.get)
    with pytest.raises(RuntimeError, match="not met after 1 rounds"):
        dac_compress(net, [{"macs_ratio": 0.3}], _loader(1), input_size=SIZE, max_rounds=1, finetune_epochs=0)
