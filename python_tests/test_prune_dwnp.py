"""DWNP parts: T(a) == slimkern.profile on hard masks, the hypernetwork, eq. 4 by hand."""
import math

import pytest
import torch

import slimkern as sk
from slimkern.prune import (FlopsModel, MaskHypernetwork, channel_groups, dwnp_objective, keep_masks, normalize_keep,
                            prune_channels, pruned_profile, resource_regularizer)

SIZE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def mbv2():
    torch.manual_seed(0)
    net = sk.models.mobilenet_v2(width_mult=0.25, last_channels=32).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8))
    return net.eval()


def test_flops_equals_profile_on_hard_masks(mbv2):
    fm = FlopsModel(mbv2, SIZE)
    groups = channel_groups(mbv2)
    assert fm.total == sk.profile(mbv2, input_size=SIZE).macs
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        keep = {n: torch.randperm(grp.channels, generator=g)[: 1 + trial * grp.channels // 4]
                for n, grp in groups.items() if n != "head"}
        masks = keep_masks(normalize_keep(keep, groups), groups)
        t = fm.flops(masks)
        prof = sk.profile(prune_channels(mbv2, keep), input_size=SIZE)
        assert int(round(t.item())) == prof.macs == pruned_profile(mbv2, keep, SIZE).macs
        assert fm.hard_cost(keep) == (prof.macs, prof.params)
        assert int(round(fm.params(masks).item())) == prof.params == sum(
            p.numel() for p in prune_channels(mbv2, keep).parameters())
        per_layer = {lc.name: lc.macs for lc in prof.branches[0].layers if lc.kind in ("conv2d", "linear")}
        assert {k: int(round(v)) for k, v in fm.layer_macs(masks).items()} == per_layer


def test_flops_gradient_hand_check():
    """Plain stem(3->c) -> BN -> dw -> BN -> fc: T = 64*9*3*s + 16*9*s + 10*s at 8x8 (dw stride 2)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
                              torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False),
                              torch.nn.BatchNorm2d(6), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(6, 10))
    fm = FlopsModel(net, SIZE)
    (g,) = fm.groups
    a = torch.full((6,), 0.5, requires_grad=True)
    t = fm.flops({g: a})
    per_channel = 64 * 9 * 3 + 16 * 9 + 10
    assert t.item() == pytest.approx(3 * per_channel)
    t.backward()
    assert torch.allclose(a.grad, torch.full((6,), float(per_channel)))
    assert fm.total == 6 * per_channel and fm.minimum([g]) == per_channel
    # params: stem 27 s + BN 2 s + dw 9 s + BN 2 s + fc 10 s + 10 (bias), soft counts too
    assert fm.params({g: a.detach()}).item() == pytest.approx(3 * (27 + 2 + 9 + 2 + 10) + 10)
    assert fm.total_params == sum(p.numel() for p in net.parameters())


def test_flops_bad_masks(mbv2):
    fm = FlopsModel(mbv2, SIZE)
    with pytest.raises(ValueError, match="unknown width group"):
        fm.flops({"nope": torch.ones(3)})
    with pytest.raises(ValueError, match="1-D tensor of 8"):
        fm.flops({"stem": torch.ones(7)})
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        fm.hard_cost({"stem": [8]})


def test_hypernetwork_masks_shapes_hard_and_trainable():
    groups = {"a": 5, "b.hidden": 3, "c": 7}
    hn = MaskHypernetwork(groups, num_devices=3, embed_dim=8, hidden=16)
    for n in range(4):
        m = hn.masks(n, generator=torch.Generator().manual_seed(n))
        assert [tuple(v.shape) for v in m.values()] == [(5,), (3,), (7,)]
        assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in m.values())
    # the offset of 3 starts (almost) every mask at keep
    assert sum(v.sum().item() for v in hn.deterministic_masks(0).values()) == 15
    loss = sum(v.sum() for v in hn.masks(2, generator=torch.Generator().manual_seed(0)).values())
    loss.backward()
    assert hn.embedding.weight.grad[2].abs().sum() > 0 and hn.embedding.weight.grad[[0, 1, 3]].abs().sum() == 0
    assert all(p.grad is not None for p in hn.gru.parameters())
    z0, z1 = hn.logits(0), hn.logits(1)
    assert not torch.allclose(z0["a"], z1["a"])  # participants differ through their embeddings
    tok = hn.layer_tokens
    torch.testing.assert_close(tok @ tok.T, torch.eye(3), atol=1e-5, rtol=0)  # orthogonal layer tokens
    with pytest.raises(ValueError):
        hn.logits(4)
    with pytest.raises(ValueError):
        MaskHypernetwork({}, 2)
    with pytest.raises(ValueError):
        MaskHypernetwork({"a": 0}, 2)


def test_regularizers_and_eq4_by_hand():
    t = torch.tensor(200.0)
    assert resource_regularizer(t, 100.0).item() == pytest.approx(math.log(2))
    assert resource_regularizer(torch.tensor(50.0), 100.0).item() == pytest.approx(math.log(2))
    assert resource_regularizer(t, 100.0, "sq_log").item() == pytest.approx(math.log(2) ** 2)
    total, parts = dwnp_objective([torch.tensor(1.0), torch.tensor(3.0)], torch.tensor(500.0),
                                  [torch.tensor(250.0), torch.tensor(100.0)], 0.5, [0.5, 0.25], 1000.0, lam=2.0)
    # task mean 2; server |log(500/500)| = 0; devices (|log(250/500)| + |log(100/250)|) / 2
    dev = (math.log(2) + math.log(2.5)) / 2
    assert total.item() == pytest.approx(2.0 + 2.0 * (0.0 + dev))
    assert parts == pytest.approx({"task": 2.0, "server": 0.0, "devices": dev})
    for bad in [dict(p_server=0.0), dict(p_server=1.5), dict(lam=-1.0)]:
        kw = dict(p_server=0.5, lam=1.0) | bad
        with pytest.raises(ValueError):
            dwnp_objective([torch.tensor(1.0)], t, [t], kw["p_server"], [0.5], 1000.0, lam=kw["lam"])
    with pytest.raises(ValueError, match="one task loss"):
        dwnp_objective([torch.tensor(1.0)], t, [t, t], 0.5, [0.5], 1000.0)
    with pytest.raises(ValueError):
        resource_regularizer(t, -1.0)
