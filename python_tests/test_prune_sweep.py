"""DAC's client sweep (Figures 4-5) and gate study: hand values, agreement with dac_federated
run on the same partition, the entropy-gradient claim behind the silent threshold, run folders."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import slimkern as sk
from slimkern.fl import partition
from slimkern.prune.dac_federated import dac_federated
from slimkern.prune.dac_gate_study import dac_gate_study
from slimkern.prune.dac_losses import entropy_loss
from slimkern.prune.dac_sweep import dac_client_sweep, shard_classes
from slimkern.prune.run_folder import write_gate_run, write_sweep_run
from slimkern.prune.summary import gate_summary, sweep_summary

SIZE = (1, 3, 8, 8)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    return TensorDataset(x, y)


def _net():
    torch.manual_seed(0)
    return sk.models.mobilenet_v2(width_mult=0.25, last_channels=16)


def test_shard_classes_by_hand():
    # two classes each once they cover ten classes; otherwise the fewest that do
    assert [shard_classes(n, 10) for n in (2, 4, 5, 8, 16)] == [5, 3, 2, 2, 2]
    assert shard_classes(3, 10, 4) == 4


def test_entropy_gradient_vanishes_at_uniform_gates():
    # the module docstring's closed form dH/dw_i = -p_i (w_i - sum_j p_j w_j), checked by autograd
    w = torch.ones(64, requires_grad=True)
    entropy_loss([w]).backward()
    assert float(w.grad.abs().max()) < 1e-7  # uniform gates: exactly stationary
    w = (1 + 0.05 * torch.randn(64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    entropy_loss([w]).backward()
    p = torch.softmax(w.detach(), 0)
    torch.testing.assert_close(w.grad, -p * (w.detach() - (p * w.detach()).sum()))
    dev = (w.detach() - w.detach().mean()).abs().max()
    assert float(w.grad.abs().max()) <= float(p.max() * dev * 1.05)  # ~ |w_i - mean w| / C: 1e-3 here


@pytest.mark.parametrize("kw, match", [
    ({"clients": [1, 4]}, "cannot cover 2 budgets"),
    ({"clients": []}, "non-empty list"),
    ({"scenarios": {"x": ("bad", 1)}}, "partition must be"),
    ({"scenarios": {"x": ("iid", 0)}}, "local_epochs"),
    ({"reference_fraction": 1.0}, "reference_fraction"),
])
def test_sweep_bad_arguments(kw, match):
    d = _data(40, 0)
    with pytest.raises(ValueError, match=match):
        dac_client_sweep(_net(), [{"macs_ratio": 0.9}, {"macs_ratio": 0.95}], d, d.tensors[1].numpy(), d,
                         input_size=SIZE, **kw)


@pytest.mark.slow
def test_sweep_matches_dac_federated_on_the_same_partition(tmp_path):
    train, test = _data(100, 0), _data(30, 1)
    labels = train.tensors[1].numpy()
    budgets = [{"macs_ratio": 0.9}, {"macs_ratio": 0.95}]
    opts = {"guard_fraction": 0.5, "finetune_epochs": 0}
    out = dac_client_sweep(_net(), budgets, train, labels, test, input_size=SIZE, clients=[2, 4],
                           scenarios={"iid": ("iid", 1), "2-class": ("shards", 1)}, rounds=1, pretrain_epochs=1,
                           batch_size=16, dac_options=opts, seed=3)
    rows = out["rows"]
    assert len(rows) == 2 * 2 * 3  # scenarios x client counts x (2 DAC models + the 1.0x)
    for r in rows:
        if r["model"] == "dac":  # clients get budgets round-robin
            i = budgets.index(r["budget"])
            assert r["members"] == list(range(i, r["clients"], 2))
        else:
            assert r["members"] == list(range(r["clients"])) and r["curve"][0] == out["full"]["accuracy"]
    assert {r["classes_per_client"] for r in rows if r["scenario"] == "2-class"} == {5, 3}
    # the same partition through dac_federated gives the same cluster curves
    perm = np.random.default_rng(3).permutation(100)
    ref, rest = perm[:20].tolist(), perm[20:]
    parts = partition(labels[rest], 4, "shards", classes_per_client=3, seed=3)
    sets = [Subset(train, rest[p].tolist()) for p in parts]
    fed = dac_federated(_net(), budgets * 2, sets, Subset(train, ref), test, input_size=SIZE, rounds=1,
                        batch_size=16, pretrain_epochs=1, width_baselines=False, dac_options=opts, seed=3)
    mine = [r for r in rows if r["scenario"] == "2-class" and r["clients"] == 4 and r["model"] == "dac"]
    assert [c.accuracy for c in fed.clusters] == [r["curve"] for r in mine]
    assert [c.params for c in fed.clusters] == [r["params"] for r in mine]
    report = {"meta": {}, "runs": [out]}
    text = sweep_summary(report)
    assert "N=4 accuracy %" in text and "classes per client: N=2: 5, N=4: 3" in text
    paths = write_sweep_run(str(tmp_path), [out], {"title": "t"})
    assert {p.rsplit("/", 1)[1] for p in paths} == {"report.json", "sweep.csv", "sweep.png"}
    assert len((tmp_path / "sweep.csv").read_text().strip().splitlines()) == 1 + len(rows)
    assert json.loads((tmp_path / "report.json").read_text())["runs"][0]["seed"] == 3


@pytest.mark.slow
def test_gate_study_threshold_fires_only_with_fast_gates(tmp_path):
    train, test = _data(100, 0), _data(30, 1)
    out = dac_gate_study(_net(), [{"macs_ratio": 0.9}], train, test, input_size=SIZE, gate_lrs=[1e-4, 50.0],
                         pretrain_epochs=1, batch_size=16, dac_options={"finetune_epochs": 0, "guard_fraction": 0.5})
    slow, fast = out["runs"]
    assert slow["threshold_channels"] == 0 and slow["guard_channels"] > 0 and slow["final_gate_min"] > 0.99
    assert fast["threshold_rounds"] >= 1 and fast["threshold_channels"] > 0
    for r in out["runs"]:  # every round is accounted to one rule, and the budget is met
        assert r["threshold_channels"] + r["guard_channels"] == sum(h["removed"] for h in r["history"])
        assert r["budgets"][0]["macs"] <= r["budgets"][0]["budget"]["macs"]
    assert "| 0.0001 |" in gate_summary({"runs": [out]})
    write_gate_run(str(tmp_path), [out], {"threshold": 0.1})
    assert (tmp_path / "gates.png").exists() and (tmp_path / "gates.csv").read_text().startswith("seed,gate_lr")


def test_gate_study_bad_arguments():
    d = _data(20, 0)
    with pytest.raises(ValueError, match="gate_lrs"):
        dac_gate_study(_net(), [{"macs_ratio": 0.9}], d, d, input_size=SIZE, gate_lrs=[])
    with pytest.raises(ValueError, match="gate_lrs"):
        dac_gate_study(_net(), [{"macs_ratio": 0.9}], d, d, input_size=SIZE, gate_lrs=[0.0])


def test_prune_is_a_public_namespace():
    from slimkern.prune import prune_channels
    assert "prune" in sk.__all__ and sk.prune.prune_channels is prune_channels


def test_local_sgd_skips_a_batch_of_one():
    # a client's last batch of one sample cannot train BN; local_sgd skips it (the sweep hit this at N = 4)
    import copy

    import torch.nn as nn
    import torch.nn.functional as F

    from slimkern.prune.fedavg import local_sgd
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    ref = copy.deepcopy(model)
    with pytest.raises(ValueError, match="more than 1 value"):
        ref.train()(x[8:])
    loss = local_sgd(model, [(x[:8], y[:8]), (x[8:], y[8:])], 1, 0.1, 0.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    want = F.cross_entropy(ref.train()(x[:8]), y[:8])
    opt.zero_grad()
    want.backward()
    opt.step()
    assert loss == pytest.approx(float(want))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
