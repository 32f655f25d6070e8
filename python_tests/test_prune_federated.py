"""The federated loops of slimkern.prune: FedAvg pieces by hand, DAC clusters, DWNP targets."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import slimkern as sk
from slimkern.prune import channel_groups
from slimkern.prune.dac_federated import dac_federated
from slimkern.prune.dwnp_federated import dwnp_federated
from slimkern.prune.fedavg import accuracy, average_states, local_sgd

SIZE = (1, 3, 8, 8)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.3  # learnable signal
    return TensorDataset(x, y)


def _net():
    torch.manual_seed(0)
    return sk.models.mobilenet_v2(width_mult=0.25, last_channels=16)


def test_average_states_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3), "h": torch.tensor([0.0], dtype=torch.float16)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(9), "h": torch.tensor([4.0], dtype=torch.float16)}
    out = average_states([a, b], [1, 3])
    assert out["w"].tolist() == [4.0, 5.0]  # (1*1 + 3*5)/4, (1*2 + 3*6)/4
    assert int(out["n"]) == 3 and out["h"].dtype == torch.float16 and out["h"].item() == 3.0
    with pytest.raises(ValueError, match="one weight per state"):
        average_states([a], [1, 2])
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": a["w"]}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        average_states([a, dict(b, w=torch.zeros(3))], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        average_states([a, b], [0, 0])


def test_local_sgd_learns_and_accuracy_counts():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    before = accuracy(model, data)
    loss = local_sgd(model, data, 20, 0.5, 0.0)
    after = accuracy(model, data)
    assert after > 0.9 > before - 0.5 and loss < 0.7
    right = int((model(x).argmax(1) == y).sum())
    assert after == right / 64


def test_dac_federated_clusters_and_budgets():
    clients = [_data(24, s) for s in range(4)]
    budgets = [{"macs_ratio": 0.9}, {"macs_ratio": 0.95}, {"macs_ratio": 0.9}, {"macs_ratio": 0.95}]
    r = dac_federated(_net(), budgets, clients, _data(32, 9), _data(40, 10), input_size=SIZE, rounds=1,
                      batch_size=12, pretrain_epochs=1, full_baseline=True,
                      dac_options={"guard_fraction": 0.6, "finetune_epochs": 0})
    assert len(r.full["fl_accuracy"]) == 2
    kinds = [(c.kind, c.budget["macs_ratio"], c.clients) for c in r.clusters]
    assert kinds == [("dac", 0.9, [0, 2]), ("width", 0.9, [0, 2]), ("dac", 0.95, [1, 3]), ("width", 0.95, [1, 3])]
    for c in r.clusters:
        assert not c.model.training
        p = sk.profile(c.model, input_size=SIZE)
        assert (p.macs, p.params, p.peak_activation_bytes) == (c.macs, c.params, c.peak_activation_bytes)
        assert c.macs < c.budget["macs_ratio"] * r.full["macs"]
        assert len(c.accuracy) == 2 and all(0 <= a <= 1 for a in c.accuracy)
    with pytest.raises(ValueError, match="one budget per client"):
        dac_federated(_net(), budgets[:3], clients, _data(8, 1), _data(8, 2), input_size=SIZE)
    with pytest.raises(ValueError, match="mixes units"):
        dac_federated(_net(), [{"macs": 10, "params_ratio": 0.5}] * 4, clients, _data(8, 1), _data(8, 2),
                      input_size=SIZE, pretrain_epochs=0)


def test_dwnp_federated_targets_and_nesting():
    clients = [_data(30, s) for s in range(2)]
    r = dwnp_federated(_net(), clients, _data(40, 10), input_size=SIZE, p_server=0.8, p_devices=[0.6, 0.45],
                       rounds=1, batch_size=10, base_fedavg=False, calibrate_batches=1)
    assert r.total_macs == sk.profile(_net().eval(), input_size=SIZE).macs
    for d in [r.server] + r.devices:
        assert abs(d.ratio - d.target) <= 0.05 * d.target, (d.index, d.ratio, d.target)
        assert not d.model.training
        p = sk.profile(d.model, input_size=SIZE)
        assert p.macs == d.macs and p.params == d.params
    for d in r.devices:  # a device model is a sub-network of the server's
        for g, k in d.keep.items():
            assert set(k) <= set(r.server.keep[g]) and len(k) >= 1
    assert len(r.history) == 1 and {"task", "server_reg", "device_reg"} <= set(r.history[0])


@pytest.mark.parametrize("kw, match", [(dict(p_devices=[0.9, 0.5]), "exceeds the server"),
                                       (dict(p_devices=[0.5]), "one FLOPs target per device"),
                                       (dict(p_devices=[0.5, -0.1]), r"in \(0, 1\]"),
                                       (dict(p_devices=[0.5, 0.001]), "below the smallest reachable"),
                                       (dict(groups=["nope"]), "unknown")])
def test_dwnp_bad_targets(kw, match):
    args = dict(p_server=0.8, p_devices=[0.5, 0.5]) | kw
    with pytest.raises(ValueError, match=match):
        dwnp_federated(_net(), [_data(10, 0), _data(10, 1)], _data(10, 2), input_size=SIZE, rounds=0, **args)


def test_default_dwnp_groups_are_the_untied_ones():
    from slimkern.prune.dwnp_federated import default_dwnp_groups
    net = _net()
    names = default_dwnp_groups(net)
    groups = channel_groups(net)
    assert "s2b1.hidden" in names and "s3" not in names  # s3 is tied by residual adds
    assert all(len(groups[n].producers) == 1 for n in names)


def test_hypernetwork_merge_keeps_each_device_embedding_row():
    from slimkern.prune.dwnp_federated import merge_hypernetwork_states
    s1 = {"embedding.weight": torch.tensor([[0.0], [1.0], [10.0]]), "gru": torch.tensor([2.0])}
    s2 = {"embedding.weight": torch.tensor([[4.0], [3.0], [20.0]]), "gru": torch.tensor([6.0])}
    out = merge_hypernetwork_states([s1, s2])
    assert out["embedding.weight"].flatten().tolist() == [2.0, 1.0, 20.0]  # row 0 mean, row n from device n
    assert out["gru"].tolist() == [4.0]
    with pytest.raises(ValueError, match="expected devices"):
        merge_hypernetwork_states([s1])


def test_project_mask_hits_the_target_and_stays_within_allowed():
    from slimkern.prune import FlopsModel
    from slimkern.prune.dwnp_federated import project_mask
    net = _net().eval()
    fm = FlopsModel(net, SIZE)
    groups = ["s2b1.hidden", "s4b2.hidden", "s6b1.hidden"]
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(fm.groups[n].channels, generator=g) for n in groups}
    allowed = {n: (torch.rand(fm.groups[n].channels, generator=g) > 0.3).float() for n in groups}
    one_each = {n: torch.zeros_like(a).index_fill(0, a.nonzero()[0], 1) for n, a in allowed.items()}
    lo, hi = fm.flops(one_each), fm.flops(allowed)
    target = float(lo + 0.5 * (hi - lo))
    m = project_mask(fm, scores, allowed, target)
    assert all(bool(((m[n] == 1) <= (allowed[n] == 1)).all()) and m[n].sum() >= 1 for n in groups)
    assert abs(float(fm.flops(m)) - target) <= 0.02 * float(fm.total)
    for n in groups:  # kept = the highest scores among the allowed channels
        kept = scores[n][m[n] == 1]
        dropped = scores[n][(m[n] == 0) & (allowed[n] == 1)]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()
