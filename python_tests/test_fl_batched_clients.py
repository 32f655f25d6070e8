"""Client-batched local training (``slimkern.fl.batched``) against the one-by-one clients.

The reference is the sequential client (``slimkern.fl.client.train_task`` on the packed C++
ops), the path ``simulate`` takes by default and a Flower ClientApp runs. Every client's
trained weights after a round, and the aggregated model after ``simulate``, must agree to
1e-5; the comparison must catch a deliberately broken batch (a client's data permuted, the
padding mask dropped). Settings are the demo's model and tiers at a learning rate where local
training does not amplify float rounding (at the demo's lr 0.2 x 5 epochs it does: the
sequential client itself moves by up to ~1e-1 under a 1e-7 perturbation of its weights;
``benchmarks/bench_fl_clients.py`` records both numbers).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fl_fixtures import digits_split, torch_threads
from slimkern.fl import make_clients, parse_tiers, simulate
from slimkern.fl.augment import RandomAffine
from slimkern.fl.batched import ClientBatcher, unsupported_reason
from slimkern.fl.client import client_aggregator, train_task
from slimkern.fl.models import small_cnn
from slimkern.fl.rules import get_rule
from slimkern.fl.rules.paradis import ParaDiSFL
from slimkern.fl.server import Server

TIERS = "full=1.0:0.3,small=0.5:0.4,two=[0.5,0.5]:0.3"  # the demo's tiers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data():
    return digits_split(300, slice(1500, 1600))


def _round(data, rule, n_clients=7, epochs=2, lr=0.05, batch_size=16, channels=(32, 64, 12), augment=True):
    (X, Y), test = data
    clients = make_clients(Y.numpy(), parse_tiers(TIERS), n_clients, "dirichlet", alpha=0.5, seed=0)
    net = small_cnn(10, 1, channels, seed=0)
    server = Server(net, get_rule(rule), clients, train_labels=Y, input_shape=X.shape[1:], test_set=test,
                    calib_set=(X, Y), seed=0, rounds=3, lr=lr, local_epochs=epochs, batch_size=batch_size,
                    log=lambda m: None)
    plan = server.begin_round(0)
    aug = RandomAffine(10, 1, 0.1, fill=float(X.min())) if augment else None
    indices = {cid: server.by_id[cid].indices for cid in plan.tasks}
    return net, server, plan, X, Y, aug, indices


def _sequential(net, plan, X, Y, aug, indices):
    work = copy.deepcopy(net)
    agg = client_aggregator(work)
    return {cid: train_task(work, t, X, Y, indices[cid], aug, agg) for cid, t in plan.tasks.items()}


def _max_diff(a, b) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[c].values - b[c].values).abs().max()) for c in a)


@pytest.mark.parametrize("rule", ["paradis", "heterofl", "fedavg", "fedrolex"])
def test_batched_round_equals_sequential_per_client(data, rule):
    net, server, plan, X, Y, aug, indices = _round(data, rule)
    sizes = {len(indices[c]) for c in plan.tasks}
    assert len(sizes) > 2  # clients of different sizes: padded steps and masks are exercised
    want = _sequential(net, plan, X, Y, aug, indices)
    got, rest = ClientBatcher(net, server.rule).train(list(plan.tasks.values()), X, Y, indices, aug)
    assert rest == [] or all(sum(t2.key == t.key for t2 in plan.tasks.values()) == 1 for t in rest)
    for t in rest:
        got[t.client] = want[t.client]
    assert len(got) == len(plan.tasks)
    assert all(got[c].num_samples == want[c].num_samples and got[c].switch == want[c].switch for c in got)
    assert _max_diff(got, want) < 1e-5
    # the clients moved: the comparison is not between two copies of the received weights
    start = {c: server.agg.extract(dict(net.named_parameters()), plan.keys[c]) for c in want}
    assert min(float((want[c].values - start[c]).abs().max()) for c in want) > 1e-3


def test_fjord_per_step_switches_are_grouped_per_step(data):
    from slimkern.fl.rules.fjord import FjORD
    net, server, plan, X, Y, aug, indices = _round(data, FjORD(bn="server", kd=True), n_clients=6)
    want = _sequential(net, plan, X, Y, aug, indices)
    got, rest = ClientBatcher(net, server.rule).train(list(plan.tasks.values()), X, Y, indices, aug)
    for t in rest:
        got[t.client] = want[t.client]
    assert _max_diff(got, want) < 1e-5


def test_a_broken_batch_is_caught(data, monkeypatch):
    net, server, plan, X, Y, aug, indices = _round(data, "paradis")
    want = _sequential(net, plan, X, Y, aug, indices)
    tasks = list(plan.tasks.values())
    # a client's data permuted (its batches then hold other samples)
    c0 = tasks[0].client
    wrong = {**indices, c0: np.roll(indices[c0], 1)}
    got, _ = ClientBatcher(net, server.rule).train(tasks, X, Y, wrong, aug)
    assert float((got[c0].values - want[c0].values).abs().max()) > 1e-3
    # the padding mask dropped: padded rows enter the BN statistics
    import slimkern.fl.batched as B
    real = B._bn_forward

    def no_mask(m, lay, x):
        mask, lay.mask = lay.mask, None
        try:
            return real(m, lay, x)
        finally:
            lay.mask = mask

    monkeypatch.setattr(B, "_bn_forward", no_mask)
    got, _ = ClientBatcher(net, server.rule).train(tasks, X, Y, indices, aug)
    assert _max_diff(got, want) > 1e-3


def test_simulate_batched_aggregate_equals_sequential(data):
    train, test = data
    clients = make_clients(train[1].numpy(), parse_tiers(TIERS), 7, "dirichlet", alpha=0.5, seed=0)
    out = {}
    for batched in (False, True):
        net = small_cnn(10, 1, (32, 64, 12), seed=0)
        logs = []
        h = simulate(net, train, test, clients, "paradis", rounds=2, local_epochs=2, lr=0.05, batch_size=16,
                     seed=0, progress=False, eval_every=2, client_batching=batched, log=logs.append)
        out[batched] = ({n: p.detach() for n, p in net.named_parameters()}, h, logs)
    (p0, h0, _), (p1, h1, logs) = out[False], out[True]
    assert not any("batching off" in m for m in logs)
    assert max(float((p0[n] - p1[n]).abs().max()) for n in p0) < 1e-5
    assert [r.accepted for r in h0.rounds] == [r.accepted for r in h1.rounds] and h1.rounds[0].accepted
    assert abs(h0.rounds[-1].tier_accuracy["full"] - h1.rounds[-1].tier_accuracy["full"]) <= 0.011


class _CustomLogits(ParaDiSFL):
    name = "paradis-custom"

    def train_logits(self, logits, key):
        return logits * 2


def test_unsupported_rules_and_nets_fall_back_with_a_reason(data):
    net = small_cnn(10, 1, (8, 12, 12), seed=0)
    why = unsupported_reason(net, _CustomLogits())
    assert "train_logits" in why
    from slimkern.fl.rules.fjord import FjORD
    assert "BN statistics" in unsupported_reason(net, FjORD(bn="travel"))
    drop = torch.nn.Sequential(net, torch.nn.Dropout(0.5))
    assert "Dropout" in unsupported_reason(drop, ParaDiSFL())
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), net)
    assert "not a slimkern layer" in unsupported_reason(plain, ParaDiSFL())
    with pytest.raises(ValueError, match="cannot be batched"):
        ClientBatcher(net, _CustomLogits())
    # simulate falls back to the one-by-one clients, says why, and equals them bit for bit
    train, test = data
    clients = make_clients(train[1].numpy(), parse_tiers(TIERS), 5, "dirichlet", alpha=0.5, seed=0)
    res = []
    for batched in (False, True):
        logs = []
        n = small_cnn(10, 1, (8, 12, 12), seed=0)
        simulate(n, train, test, clients, _CustomLogits(), rounds=1, local_epochs=1, lr=0.05, seed=0,
                 progress=False, client_batching=batched, log=logs.append)
        res.append((torch.cat([p.detach().flatten() for p in n.parameters()]), logs))
    assert torch.equal(res[0][0], res[1][0])
    assert any("client batching off" in m and "train_logits" in m for m in res[1][1])


class _MixesSamples(torch.nn.Module):
    """A net whose forward mixes the samples of a batch (not a per-sample computation)."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn(10, 1, (8, 12, 12), seed=0)

    def forward(self, x):
        return self.body(x - x.mean(0, keepdim=True))


def test_a_forward_that_mixes_samples_is_trained_one_by_one(data):
    net = _MixesSamples()
    (X, Y), test = data
    clients = make_clients(Y.numpy(), parse_tiers(TIERS), 5, "dirichlet", alpha=0.5, seed=0)
    server = Server(net, get_rule("paradis"), clients, train_labels=Y, input_shape=X.shape[1:], test_set=test,
                    calib_set=(X, Y), seed=0, rounds=1, lr=0.05, local_epochs=1, log=lambda m: None)
    plan = server.begin_round(0)
    assert unsupported_reason(net, server.rule) is None  # modules alone do not show it
    b = ClientBatcher(net, server.rule)
    got, rest = b.train(list(plan.tasks.values()), X, Y, {c: server.by_id[c].indices for c in plan.tasks})
    assert got == {} and len(rest) == len(plan.tasks)
    assert b.reasons and "mixes samples" in b.reasons[0]


def test_non_finite_loss_drops_the_client_like_the_sequential_path(data):
    (X, Y), test = data
    X = X.clone()
    clients = make_clients(Y.numpy(), parse_tiers(TIERS), 6, "dirichlet", alpha=0.5, seed=0)
    X[clients[1].indices[0]] = float("nan")
    rec = {}
    for batched in (False, True):
        h = simulate(small_cnn(10, 1, (8, 12, 12), seed=0), (X, Y), test, clients, "paradis", rounds=1,
                     local_epochs=1, lr=0.05, seed=0, progress=False, client_batching=batched, log=lambda m: None)
        rec[batched] = h.rounds[0]
    assert rec[True].dropped_reasons == rec[False].dropped_reasons
    assert [c for c, _ in rec[True].dropped_reasons] == [1]
    assert "not finite" in rec[True].dropped_reasons[0][1]


def test_pass_split_is_the_cheapest_partition():
    """``_chunks`` against brute force over every partition of the clients into passes."""
    import itertools
    import random

    from slimkern.fl.batched import _chunks

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            for i in range(len(p)):
                yield p[:i] + [[first] + p[i]] + p[i + 1:]
            yield [[first]] + p

    rng = random.Random(0)
    for case in range(40):
        n = rng.randint(1, 7)
        sizes = [rng.randint(2, 16) for _ in range(n)]
        members = list(range(10, 10 + n))
        pass_rows = rng.choice([0, 8, 64])
        max_rows = rng.choice([None, 20, 40])
        size = dict(zip(members, sizes))

        def cost(p):
            return sum(pass_rows + len(c) * max(size[m] for m in c) for c in p)

        def fits(p):
            return max_rows is None or all(len(c) == 1 or len(c) * max(size[m] for m in c) <= max_rows for c in p)

        got = _chunks(members, sizes, pass_rows, max_rows)
        assert sorted(itertools.chain(*got)) == members and fits(got)
        assert cost(got) == min(cost(p) for p in partitions(members) if fits(p)), (sizes, pass_rows, max_rows)


def test_a_failing_batched_round_falls_back(data, monkeypatch):
    import slimkern.fl.batched as B

    def boom(self, *a, **k):
        raise RuntimeError("out of memory (simulated)")

    train, test = data
    clients = make_clients(train[1].numpy(), parse_tiers(TIERS), 5, "dirichlet", alpha=0.5, seed=0)
    res = []
    for batched in (False, True):
        if batched:
            monkeypatch.setattr(B.ClientBatcher, "train", boom)
        logs = []
        n = small_cnn(10, 1, (8, 12, 12), seed=0)
        simulate(n, train, test, clients, "paradis", rounds=1, local_epochs=1, lr=0.05, seed=0, progress=False,
                 client_batching=batched, log=logs.append)
        res.append((torch.cat([p.detach().flatten() for p in n.parameters()]), logs))
    assert torch.equal(res[0][0], res[1][0])
    assert any("client batching failed" in m and "out of memory" in m for m in res[1][1])
