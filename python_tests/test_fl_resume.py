"""Resume that cannot silently continue another run (issue 13, point 5).

A run killed in the middle of a round and resumed from its checkpoint equals the run that
was never interrupted, bit for bit, under every rule, with a cosine schedule, client
dropout and an ``nn.Dropout`` layer in the net (whose randomness must come from the
``(seed, round, client)`` stream, not from torch's global generator). A checkpoint of
another run is refused with the name of the field that differs.
"""
import os

import numpy as np
import pytest
import torch

from slimkern import Switch
from slimkern.fl import make_clients, parse_tiers, simulate
from slimkern.fl.models import SmallCNN
from slimkern.fl.strategy import Clustered, FedAvg, FedRolex, FjORD, HeteroFL, ParaDiSFL

RULES = ["fedavg", "heterofl", "fedrolex", "fjord", "paradis", "clustered"]


class DropCNN(SmallCNN):
    """SmallCNN with dropout before the classifier (draws from torch's global generator)."""

    def __init__(self, p=0.3):
        super().__init__(channels=(8, 16, 16))
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        return self.classifier(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


def drop_net(seed=1, p=0.3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DropCNN(p)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    g = np.random.default_rng(0).permutation(len(Y))
    tr, te = g[:240], g[1500:1620]
    return (X[tr], Y[tr]), (X[te], Y[te])


def clients_of(train):
    tiers = parse_tiers("full=1.0:0.34,small=0.5:0.33,two=[0.5,0.5]:0.33")
    return make_clients(train[1].numpy(), tiers, 6, "iid", seed=0)


BASE = dict(rounds=3, local_epochs=1, lr=0.1, batch_size=32, clients_per_round=4, seed=5, progress=False,
            lr_schedule="cosine", dropout=0.3, momentum=0.9, weight_decay=5e-4)


def run(data, strategy, net=None, **kw):
    train, test = data
    net = drop_net() if net is None else net
    h = simulate(net, train, test, clients_of(train), strategy, calib_set=test, **{**BASE, **kw})
    return net, h


class Kill(BaseException):
    """What a killed process looks like to the code that was running (not an Exception)."""


def same_history(ha, hb):
    assert len(ha.rounds) == len(hb.rounds)
    for a, b in zip(ha.rounds, hb.rounds):
        da, db = dict(vars(a)), dict(vars(b))
        da.pop("wall_time"), db.pop("wall_time")
        assert da == db


def same_weights(na, nb):
    sa, sb = na.state_dict(), nb.state_dict()
    assert sa.keys() == sb.keys()
    for n, t in sa.items():
        assert torch.equal(t, sb[n]) if isinstance(t, torch.Tensor) else t == sb[n], n


@pytest.mark.parametrize("rule", RULES)
def test_kill_mid_round_then_resume_equals_uninterrupted(data, tmp_path, rule):
    torch.manual_seed(100)
    net_a, ha = run(data, rule)
    ck = str(tmp_path / "ck.pt")
    seen = []

    def killer(r, u):
        if r == 1:  # round 1, after the first of its clients has trained
            seen.append(u.client)
            raise Kill()
        return u

    torch.manual_seed(200)  # a different global RNG state: must not matter
    with pytest.raises(Kill):
        run(data, rule, checkpoint=ck, fault_fn=killer)
    assert torch.load(ck, weights_only=True)["round"] == 1  # round 0 was saved, round 1 was not
    torch.manual_seed(300)
    net_b, hb = run(data, rule, checkpoint=ck, resume=True)
    same_weights(net_a, net_b)
    same_history(ha, hb)
    assert any(r.dropped for r in ha.rounds)  # client dropout happened


def test_same_seed_same_weights_with_dropout_layer_and_global_rng_untouched(data):
    torch.manual_seed(1)
    net_a, ha = run(data, "paradis", rounds=2)
    after_a = torch.rand(3)
    torch.manual_seed(2)
    net_b, hb = run(data, "paradis", rounds=2)
    same_weights(net_a, net_b)
    same_history(ha, hb)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # the run drew nothing from the caller's generator


def test_strategy_reprs_carry_their_arguments():
    assert "step=0.75" in repr(FedRolex(step=0.75)) and repr(FedRolex(step=0.75)) != repr(FedRolex(step=0.5))
    assert "0.5" in repr(FjORD(widths=(0.5, 1.0))) and repr(FjORD(widths=(0.5, 1.0))) != repr(FjORD())
    assert repr(FedAvg(switch=Switch([0.25]))) != repr(FedAvg())
    assert repr(ParaDiSFL(nested=False)) != repr(ParaDiSFL())
    assert repr(HeteroFL()) == repr(HeteroFL()) and repr(Clustered()).startswith("Clustered(")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("ck") / "ck.pt")
    run(data, FedRolex(step=0.75), rounds=1, checkpoint=ck)
    return ck


@pytest.mark.parametrize("field,change", [
    ("lr", dict(lr=0.05)), ("lr_schedule", dict(lr_schedule="constant")), ("rounds", dict(rounds=2)),
    ("local_epochs", dict(local_epochs=2)), ("batch_size", dict(batch_size=16)), ("momentum", dict(momentum=0.5)),
    ("weight_decay", dict(weight_decay=0.0)), ("dropout", dict(dropout=0.1)),
    ("clients_per_round", dict(clients_per_round=3)), ("seed", dict(seed=6)),
    ("strategy", dict(strategy=FedRolex(step=0.5))), ("initial_weights", dict(net_seed=2)),
    ("max_update_norm", dict(max_update_norm=1.0)), ("model", dict(drop_p=0.5)),
])
def test_checkpoint_of_another_run_names_the_field(data, finished, field, change):
    change = dict(change)
    strategy = change.pop("strategy", FedRolex(step=0.75))
    net = drop_net(change.pop("net_seed", 1), change.pop("drop_p", 0.3))
    kw = {"rounds": 1, **change}
    with pytest.raises(ValueError, match=rf"belongs to another run \({field} differ"):
        run(data, strategy, net=net, checkpoint=finished, resume=True, **kw)
    # the same run resumes (nothing left to do)
    run(data, FedRolex(step=0.75), rounds=1, checkpoint=finished, resume=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("SLIMKERN_EVIL_FLAG", "/tmp/slimkern-evil-flag"),))


def test_checkpoint_is_loaded_weights_only(data, tmp_path, monkeypatch):
    ck = str(tmp_path / "ck.pt")
    run(data, "heterofl", rounds=1, checkpoint=ck)
    assert torch.load(ck, weights_only=True)["round"] == 1
    flag = tmp_path / "evil-ran"
    monkeypatch.setenv("SLIMKERN_EVIL_FLAG", str(flag))
    bad = torch.load(ck, weights_only=True)
    bad["extra"] = _Evil()
    torch.save(bad, ck)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        run(data, "heterofl", rounds=1, checkpoint=ck, resume=True)
    assert not flag.exists()


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint readable, and no temp file."""
    ck = str(tmp_path / "ck.pt")
    run(data, "paradis", rounds=2, checkpoint=ck)
    good = open(ck, "rb").read()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        run(data, "paradis", rounds=2, checkpoint=str(tmp_path / "ck.pt"), lr=0.2)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(ck, "rb").read() == good
    assert os.listdir(tmp_path) == ["ck.pt"]
