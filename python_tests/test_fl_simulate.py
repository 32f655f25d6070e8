"""Small end-to-end federated runs on digits (8x8) with a tiny slimmable CNN."""
import math

import numpy as np
import pytest
import torch

from slimkern import Switch
from slimkern.fl import parse_tiers, make_clients, simulate
from slimkern.fl.aggregate import ClientUpdate
from slimkern.fl.models import small_cnn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # many tiny ops: a second OpenMP thread only adds barrier stalls on a shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    X = (X - 0.3) / 0.4
    Y = torch.tensor(d.target)
    g = np.random.default_rng(0).permutation(len(Y))
    tr, te = g[:400], g[1500:1650]
    return (X[tr], Y[tr]), (X[te], Y[te])


def _clients(train, n=6, seed=0):
    tiers = parse_tiers("full=1.0:0.34,small=0.5:0.33,two=[0.5,0.5]:0.33")
    return make_clients(train[1].numpy(), tiers, n, "dirichlet", alpha=1.0, seed=seed)


def _run(data, strategy="paradis", rounds=2, **kw):
    train, test = data
    net = small_cnn(channels=(8, 16, 16), seed=1)
    kw.setdefault("clients_per_round", 6)
    h = simulate(net, train, test, _clients(train), strategy, rounds=rounds, local_epochs=2, lr=0.1,
                 batch_size=32, seed=3, progress=False, **kw)
    return net, h


def test_parse_tiers_and_clients():
    tiers = parse_tiers("1.0:0.3,0.5:0.4,[0.5,0.5]:0.3")
    assert [t.switch for t in tiers] == [Switch([1.0]), Switch([0.5]), Switch([0.5, 0.5])]
    assert [t.name for t in tiers] == ["[1.0]x", "[0.5]x", "[0.5, 0.5]x"]
    cl = make_clients(np.arange(200) % 10, tiers, 20, "iid", seed=0)
    counts = {t.name: sum(c.tier == t.name for c in cl) for t in tiers}
    assert counts == {"[1.0]x": 6, "[0.5]x": 8, "[0.5, 0.5]x": 6}
    assert sorted(np.concatenate([c.indices for c in cl]).tolist()) == list(range(200))
    with pytest.raises(ValueError, match="sum to 0.9"):
        parse_tiers("1.0:0.5,0.5:0.4")
    with pytest.raises(ValueError, match="expected 'switch:fraction'"):
        parse_tiers("1.0")


def test_small_run_learns_and_counts_bytes(data):
    net, h = _run(data, "paradis", rounds=5)
    assert len(h.rounds) == 5
    assert h.tiers == {"full": "[1.0]x", "small": "[0.5]x", "two": "[0.5, 0.5]x"}
    last = h.last_accuracy()
    assert set(last) == {"full", "small", "two"} and all(a > 0.3 for a in last.values()), last  # chance: 0.1
    # bytes: per client the sliced parameter count of its switch x 4 bytes, down and up
    from slimkern.nn import parameter_ranges
    params = dict(net.named_parameters())

    def nbytes(sw):
        seen = set()
        for name, wins in parameter_ranges(net, sw, buffers=False).items():
            for w in wins:
                idx = torch.arange(params[name].numel()).view(params[name].shape)[w].flatten().tolist()
                seen.update((name, i) for i in idx)
        return 4 * len(seen)

    r0 = h.rounds[0]
    cl = _clients(data[0])
    for tier, sw in (("full", Switch([1.0])), ("small", Switch([0.5])), ("two", Switch([0.5, 0.5]))):
        n = sum(c.tier == tier for c in cl)
        assert r0.bytes_down[tier] == r0.bytes_up[tier] == n * nbytes(sw)
    assert nbytes(Switch([0.5])) < nbytes(Switch([0.5, 0.5])) < nbytes(Switch([1.0]))
    assert all(r.wall_time > 0 for r in h.rounds)


def test_deterministic_and_resume_identical(data, tmp_path):
    net_a, ha = _run(data, "heterofl", rounds=3)
    ck = str(tmp_path / "ck.pt")

    class Kill(BaseException):  # the run is killed in round 2 (the checkpoint holds rounds 0-1)
        pass

    def kill(r, u):
        if r == 2:
            raise Kill()
        return u

    with pytest.raises(Kill):
        _run(data, "heterofl", rounds=3, checkpoint=ck, fault_fn=kill)
    net_b, hb = _run(data, "heterofl", rounds=3, checkpoint=ck, resume=True)
    sa, sb = net_a.state_dict(), net_b.state_dict()
    assert sa.keys() == sb.keys()
    for n, a in sa.items():
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, sb[n]), n
    assert [r.accuracy for r in ha.rounds] == [r.accuracy for r in hb.rounds]
    assert [r.bytes_up for r in ha.rounds] == [r.bytes_up for r in hb.rounds]
    with pytest.raises(ValueError, match="belongs to another run"):
        _run(data, "paradis", rounds=3, checkpoint=ck, resume=True)


def test_faults_rejected_model_finite(data):
    def poison(r, u: ClientUpdate):
        v = u.values.clone()
        if u.client == 0:
            v[5] = float("nan")
        elif u.client == 1:
            v = v[:-3]
        elif u.client == 2:
            return ClientUpdate(u.client, Switch([0.25]), u.values, u.num_samples)  # not its switch
        elif u.client == 3:
            return None  # drops out after training
        return ClientUpdate(u.client, u.switch, v, u.num_samples)

    logs = []
    net, h = _run(data, "paradis", rounds=2, fault_fn=poison, log=logs.append)
    for r in h.rounds:
        why = dict(r.rejected)
        assert "NaN" in why[0] and "flat vector of" in why[1] and "was assigned" in why[2]
        assert r.accepted == [4, 5] and r.dropped == [3]
    assert sum("rejected update of client 0" in m for m in logs) == 2
    assert all(torch.isfinite(t).all() for t in net.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_nobody_returns_model_unchanged(data):
    train, test = data
    net = small_cnn(channels=(8, 16, 16), seed=1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    logs = []
    h = simulate(net, train, test, _clients(train), "paradis", rounds=1, seed=0, progress=False,
                 fault_fn=lambda r, u: None, log=logs.append)
    assert "unchanged" in h.rounds[0].note and any("unchanged" in m for m in logs)
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n])


def _labels_of(Y, c):
    have = set(Y[torch.as_tensor(c.indices)].tolist())
    return None if have >= set(Y.tolist()) else tuple(sorted(have))


# per strategy: the width each tier trains, the rule's reference weighting, label split
RULES = {
    "fedavg": ({"full": 0.5, "small": 0.5, "two": 0.5}, "samples", False),
    "heterofl": ({"full": 1.0, "small": 0.5, "two": 0.5}, "clients", True),
    "fjord": ({"full": 1.0, "small": 0.5, "two": 0.5}, "samples", False),
    "fedrolex": ({"full": 1.0, "small": 0.5, "two": 0.5}, "clients", True),
    "clustered": ({"full": 1.0, "small": 0.5, "two": 0.5}, "samples", False),
}


@pytest.mark.parametrize("strategy", sorted(RULES))
def test_first_round_is_the_rules_element_mean(data, strategy):
    """Every update of round 0 is captured and decoded here from the reference index sets
    (prefixes; FedRolex's roll(arange(C), 0)[:L]; the classifier rows of the labels a client
    holds under label split); the new model must be the element-wise mean written in
    fl_reference (count mean for HeteroFL/FedRolex, sample mean for FedAvg/FjORD/clustered),
    and clustered keeps one such model per group."""
    from fl_reference import decode, element_mean, index_sets, mask_of, small_cnn_roles
    train, _ = data
    widths, weighting, split = RULES[strategy]
    p0 = {n: t.detach().clone() for n, t in small_cnn(channels=(8, 16, 16), seed=1).named_parameters()}
    shapes = {n: t.shape for n, t in p0.items()}
    roles = small_cnn_roles((8, 16, 16))
    got = []
    net, h = _run(data, strategy, rounds=1, fault_fn=lambda r, u: got.append(u) or u)
    assert sorted(u.client for u in got) == list(range(6)) and h.rounds[0].accepted == list(range(6))
    by_group = {}
    for u, c in zip(sorted(got, key=lambda u: u.client), _clients(train)):
        labels = _labels_of(train[1], c) if split else None
        assert getattr(u.switch, "labels", None) == labels
        w = widths[c.tier]
        sets = index_sets(roles, shapes, w, 0 if strategy == "fedrolex" else None, None, labels)
        by_group.setdefault(w, []).append((decode(u.values, sets, shapes), mask_of(sets, shapes), len(c.indices)))
    if strategy == "clustered":
        assert set(h.models) == {"[1.0]x", "[0.5]x"}
        for w, ups in by_group.items():
            want = element_mean(p0, ups, weighting)
            model = h.models[str(Switch([w]))]
            for n in p0:
                torch.testing.assert_close(model[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
        # net is left with the widest group's model
        for n, t in net.named_parameters():
            assert torch.equal(t.detach(), h.models["[1.0]x"][n])
        return
    want = element_mean(p0, [x for ups in by_group.values() for x in ups], weighting)
    for n, t in net.named_parameters():
        torch.testing.assert_close(t.detach(), want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("strategy", ["fedavg", "fedrolex", "fjord", "clustered", "heterofl"])
def test_other_strategies_learn(data, strategy):
    net, h = _run(data, strategy, rounds=6)
    acc = h.last_accuracy()
    # chance is 0.1 (sd 0.025 on 150 test images); these tiny runs reach 0.2-0.45
    assert set(acc) == {"full", "small", "two"} and all(a > 0.17 for a in acc.values()), acc
    if strategy == "fedavg":
        assert set(h.tiers.values()) == {"[0.5]x"}
        assert set(h.rounds[0].bytes_up) == {"full", "small", "two"}
    if strategy == "clustered":
        assert h.tiers == {"full": "[1.0]x", "small": "[0.5]x", "two": "[0.5]x"}
        # every group's model is kept and scores what the history says it scored
        from slimkern.fl.simulate import _accuracy
        test = data[1]
        for tier, sw in h.tiers.items():
            m = small_cnn(channels=(8, 16, 16))
            m.load_state_dict(h.models[sw])
            assert _accuracy(m, test[0], test[1], Switch.parse(sw), 256) == acc[tier]


def test_bad_arguments(data):
    train, test = data
    net = small_cnn(channels=(8, 16, 16))
    cl = _clients(train)
    with pytest.raises(ValueError, match="unknown strategy"):
        simulate(net, train, test, cl, "fedprox", rounds=1, progress=False)
    with pytest.raises(ValueError, match="clients_per_round must be in"):
        simulate(net, train, test, cl, "paradis", rounds=1, clients_per_round=99, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        simulate(net, train, test, cl, "paradis", rounds=1, resume=True, progress=False)


@pytest.mark.parametrize("step", [None, 0.25])
def test_fedrolex_wrapped_round_trains_exactly_the_dense_index_sets(data, step):
    """Round 1 of width-0.5 clients: every layer's window wraps (roll = 1 mod C, one channel
    per round; or round(0.25 C) for step=0.25). The elements that change in that round are
    exactly W[idx_out][:, idx_in] with idx = torch.roll(torch.arange(C), roll)[:C/2] (cross
    blocks across the wrap included; classifier rows of the labels the clients hold)."""
    from fl_reference import index_sets, mask_of, small_cnn_roles
    from slimkern.fl.strategy import FedRolex
    train, test = data
    clients = make_clients(train[1].numpy(), parse_tiers("half=0.5:1.0"), 3, "iid", seed=0)

    def run(rounds):
        net = small_cnn(channels=(8, 16, 16), seed=1)
        simulate(net, train, test, clients, FedRolex(step=step), rounds=rounds, local_epochs=1, lr=0.1,
                 batch_size=32, seed=3, progress=False)
        return {n: t.detach().clone() for n, t in net.named_parameters()}

    before, after = run(1), run(2)
    shapes = {n: t.shape for n, t in before.items()}
    want = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    for c in clients:
        sets = index_sets(small_cnn_roles((8, 16, 16)), shapes, 0.5, 1, step, _labels_of(train[1], c))
        for n, m in mask_of(sets, shapes).items():
            want[n] |= m
    if step is None:  # C = 8: channels {7, 0, 1, 2}; C = 16: {15, 0, ..., 6}
        assert want["features.2.weight"][15, 7].all() and want["features.2.weight"][0, 0].all()
        assert not want["features.2.weight"][7, 7].any()
    for n in shapes:
        assert torch.equal(after[n] != before[n], want[n]), n


def test_fjord_bn_statistics_travel_and_average_per_width(data, tmp_path):
    """FjORD(bn="travel"), as Flower's baseline's per-width ODBatchNorm2d statistics travel:
    each client returns the running statistics of every width p <= p_max; the server's
    statistics of width p are the example-weighted mean over the clients with p_max >= p
    (fjord_average), and evaluation uses them instead of recalibrating."""
    from slimkern.fl.strategy import FjORD
    from slimkern.nn.batchnorm import _SwitchableBatchNorm
    train, _ = data
    got = []
    ck = str(tmp_path / "fjord.pt")
    net, h = _run(data, FjORD(bn="travel"), rounds=1, checkpoint=ck, fault_fn=lambda r, u: got.append(u) or u)
    pmax = {"full": 1.0, "small": 0.5, "two": 0.5}
    widths = (0.25, 0.5, 0.75, 1.0)
    clients = {c.id: c for c in _clients(train)}
    for u in got:
        assert set(u.stats) == {Switch([w]) for w in widths if w <= pmax[clients[u.client].tier]}
    saved = torch.load(ck, weights_only=True)["bn"]
    bns = {n: m for n, m in net.named_modules() if isinstance(m, _SwitchableBatchNorm)}
    for w in widths:
        holders = [(len(clients[u.client].indices), u.stats[Switch([w])]) for u in got
                   if pmax[clients[u.client].tier] >= w]
        tot = sum(n for n, _ in holders)
        for name, m in bns.items():
            mean = sum(n * s[name][0].double() for n, s in holders) / tot
            var = sum(n * s[name][1].double() for n, s in holders) / tot
            torch.testing.assert_close(saved[str(Switch([w]))][name][0].double(), mean)
            torch.testing.assert_close(saved[str(Switch([w]))][name][1].double(), var)
            if w in (0.5, 1.0):  # the evaluated switches: net holds the travelled statistics
                row = m.switch_row(Switch([w]))
                torch.testing.assert_close(m.running_mean[row].double(), mean)
                torch.testing.assert_close(m.running_var[row].double(), var)
    with pytest.raises(ValueError, match="bn must be"):
        FjORD(bn="local")


def test_fjord_bad_bn_statistics_are_left_out(data, tmp_path):
    """A client whose travelled statistics are malformed (NaN, wrong shape, not a dict) is
    left out of the statistics average; the run goes on and the rows stay finite."""
    from slimkern.fl.strategy import FjORD

    def spoil(r, u):
        if u.client == 0:
            u.stats = {sw: {n: (torch.full_like(m, float("nan")), v) for n, (m, v) in per.items()}
                       for sw, per in u.stats.items()}
        elif u.client == 1:
            u.stats = {sw: {n: (m[:1], v[:1]) for n, (m, v) in per.items()} for sw, per in u.stats.items()}
        elif u.client == 2:
            u.stats = "not statistics"
        return u

    ck = str(tmp_path / "fjord.pt")
    net, h = _run(data, FjORD(bn="travel"), rounds=1, checkpoint=ck, fault_fn=spoil)
    assert h.rounds[0].accepted == list(range(6))  # the weights of those clients are fine
    saved = torch.load(ck, weights_only=True)["bn"]
    assert saved and all(torch.isfinite(t).all() for per in saved.values() for mv in per.values() for t in mv)
