"""One bad client never stops a run (issue 13, point 2).

Aggregation rules on a tiny hand-written model (windows written out as in
test_fl_aggregate.py), then whole simulated rounds under every rule with clients that send
NaN, wrong lengths, the wrong switch, absurd sample counts, or whose training raises.
Expected values are element-wise means computed here, element by element.
"""
import numpy as np
import pytest
import torch

from slimkern import Switch
from slimkern.fl import ClientUpdate, clustered, fedavg, fjord, heterofl, paradis

S = slice
SHAPES = {"conv.weight": (4, 1), "h.weight": (4, 4), "h.bias": (4,), "fc.weight": (3, 4), "fc.bias": (3,)}
SWITCHES = {"full": [(0, 4)], "half": [(0, 2)], "pd": [(0, 2), (2, 4)], "mid": [(1, 3)]}


def windows(sw):
    """Windows of a named switch, or of a ``Switch`` (its fractions of the 4 channels)."""
    w = {n: [] for n in SHAPES}
    ranges = SWITCHES[sw] if isinstance(sw, str) else [(round(4 * a), round(4 * b)) for a, b in sw.branches]
    for a, b in ranges:
        w["conv.weight"].append((S(a, b), S(0, 1)))
        w["h.weight"].append((S(a, b), S(a, b)))
        w["h.bias"].append((S(a, b),))
        w["fc.weight"].append((S(0, 3), S(a, b)))
        w["fc.bias"].append((S(0, 3),))  # every branch lists the shared classifier bias
    return w


def params0(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*s, generator=g).to(dtype) for n, s in SHAPES.items()}


def const_update(client, sw, value, n, dtype=torch.float32):
    p = params0()
    sliced = {name: [torch.full(p[name][win].shape, float(value), dtype=dtype) for win in wins]
              for name, wins in windows(sw).items()}
    return ClientUpdate(client, sw, sliced, n)


def test_fedavg_mixed_switches_rejects_instead_of_raising():
    p = params0()
    ups = [const_update(0, "half", 1.0, 1), const_update(1, "full", 9.0, 1), const_update(2, "half", 4.0, 2)]
    new, rep = fedavg(p, ups, windows)
    assert rep.accepted == [0, 2]
    assert [c for c, _ in rep.rejected] == [1] and "one switch" in rep.rejected[0][1]
    # the half window: (1*1 + 2*4) / 3 = 3; outside it the old values
    assert torch.equal(new["h.weight"][:2, :2], torch.full((2, 2), 3.0))
    assert torch.equal(new["h.weight"][2:], p["h.weight"][2:])


def test_clustered_update_of_unknown_group_rejected():
    p = params0()
    new, reps = clustered({"half": p}, [const_update(0, "half", 2.0, 1), const_update(1, "full", 5.0, 1)], windows)
    assert reps["half"].accepted == [0]
    assert any(c == 1 and "group" in why for c, why in sum((r.rejected for r in reps.values()), []))
    assert torch.equal(new["half"]["h.bias"][:2], torch.full((2,), 2.0))


@pytest.mark.parametrize("rule", [heterofl, fjord])
def test_prefix_rules_reject_non_prefix_switch(rule):
    p = params0()
    logs = []
    mid, half = const_update(0, "mid", 7.0, 1), const_update(1, "half", 3.0, 1)
    mid.switch, half.switch = Switch.ranges([(0.25, 0.75)]), Switch([0.5])
    new, rep = rule(p, [mid, half], windows, log=logs.append)
    assert rep.accepted == [1] and rep.rejected[0][0] == 0 and "prefix" in rep.rejected[0][1]
    assert any("rejected update of client 0" in m for m in logs)
    assert torch.equal(new["h.bias"], torch.tensor([3.0, 3.0, *p["h.bias"][2:].tolist()]))


def test_two_finite_huge_updates_do_not_overflow():
    p = params0()
    ups = [const_update(0, "full", 3e38, 1), const_update(1, "full", 3e38, 1)]
    new, rep = paradis(p, ups, windows)
    assert rep.accepted == [0, 1]
    for t in new.values():
        assert torch.isfinite(t).all()
        assert torch.allclose(t, torch.full_like(t, 3e38), rtol=1e-6)


def test_overflow_in_float64_rejects_the_round_model_unchanged():
    p = params0(torch.float64)
    ups = [const_update(0, "full", 1e308, 1, torch.float64), const_update(1, "full", 1e308, 1, torch.float64)]
    logs = []
    new, rep = paradis(p, ups, windows, log=logs.append)
    assert rep.accepted == [] and sorted(c for c, _ in rep.rejected) == [0, 1]
    assert all("not finite" in why for _, why in rep.rejected)
    for n, t in new.items():
        assert torch.equal(t, p[n])


@pytest.mark.parametrize("bad", [1e39, float("inf"), float("nan"), 0, -3, True, "3", None])
def test_absurd_sample_counts_rejected(bad):
    p = params0()
    new, rep = paradis(p, [const_update(0, "full", 5.0, bad), const_update(1, "half", 1.0, 1)], windows)
    assert rep.accepted == [1] and rep.rejected[0][0] == 0 and "num_samples" in rep.rejected[0][1]
    assert torch.equal(new["h.weight"][:2, :2], torch.ones(2, 2))


def test_numpy_sample_counts_accepted_and_weighted():
    p = params0()
    ups = [const_update(0, "half", 1.0, np.int64(3)), const_update(1, "half", 5.0, np.float32(1.0)),
           const_update(2, "half", 9.0, torch.tensor(4))]
    new, rep = paradis(p, ups, windows)
    assert rep.accepted == [0, 1, 2] and not rep.rejected
    want = (3 * 1.0 + 1 * 5.0 + 4 * 9.0) / 8
    assert torch.allclose(new["h.weight"][:2, :2], torch.full((2, 2), want))


def test_conflicting_copies_of_shared_bias_are_averaged():
    p = params0()
    u = const_update(0, "pd", 1.0, 2)
    u.values["fc.bias"] = [torch.full((3,), 2.0), torch.full((3,), 4.0)]  # the two branches disagree
    v = const_update(1, "full", 6.0, 1)
    new, rep = paradis(p, [u, v], windows)
    assert rep.accepted == [0, 1]
    # client 0's bias is the mean of its two copies (3), then weighted with client 1's: (2*3 + 1*6) / 3 = 4
    assert torch.allclose(new["fc.bias"], torch.full((3,), 4.0))
    assert torch.allclose(new["h.weight"][:2, :2], torch.full((2, 2), (2 * 1.0 + 6.0) / 3))


# -- whole rounds under every rule ---------------------------------------------------------

from slimkern.fl import make_clients, parse_tiers, simulate  # noqa: E402
from slimkern.fl.models import SmallCNN  # noqa: E402

RULES = ["fedavg", "heterofl", "fedrolex", "fjord", "paradis", "clustered"]
OOM, NAN_CLIENT, OOM_CLIENT = 1234.0, 7, 6


class FlakyCNN(SmallCNN):
    """Raises (as an out-of-memory would) on a batch that holds the sentinel pixel value."""

    def forward(self, x):
        if bool((x == OOM).any()):
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(x)


def flaky_net(seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FlakyCNN(channels=(8, 16, 16))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    g = np.random.default_rng(0).permutation(len(Y))
    tr, te = g[:400], g[1500:1650]
    return (X[tr], Y[tr]), (X[te], Y[te])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ten_clients(train):
    tiers = parse_tiers("full=1.0:0.4,small=0.5:0.3,two=[0.5,0.5]:0.3")
    return make_clients(train[1].numpy(), tiers, 10, "iid", seed=0)


def poison(r, u):
    """Clients 0-5 send something wrong (5: a NumPy count, which is fine)."""
    n = len_of[u.client]
    if u.client == 0:
        v = u.values.clone()
        v[3] = float("nan")
        return ClientUpdate(u.client, u.switch, v, u.num_samples)
    if u.client == 1:
        return ClientUpdate(u.client, u.switch, u.values[:-3], u.num_samples)
    if u.client == 2:
        return ClientUpdate(u.client, Switch([0.25]), u.values, u.num_samples)
    if u.client == 3:
        return ClientUpdate(u.client, u.switch, u.values, 1e39)
    if u.client == 4:
        return ClientUpdate(u.client, u.switch, u.values, n + 1)
    if u.client == 5:
        return ClientUpdate(u.client, u.switch, u.values, np.int64(n))
    return u


len_of: dict = {}


@pytest.mark.parametrize("rule", RULES)
def test_every_bad_client_is_rejected_or_dropped_under_every_rule(digits, rule):
    (X, Y), test = digits
    X = X.clone()
    clients = ten_clients((X, Y))
    len_of.clear()
    len_of.update({c.id: len(c.indices) for c in clients})
    X[clients[OOM_CLIENT].indices] = OOM            # its local training raises
    X[clients[NAN_CLIENT].indices] = float("nan")   # its loss is NaN
    net = flaky_net()
    logs = []
    h = simulate(net, (X, Y), test, clients, rule, rounds=1, local_epochs=1, lr=0.1, batch_size=32,
                 seed=3, progress=False, calib_set=test, fault_fn=poison, log=logs.append)
    r = h.rounds[0]
    why = dict(r.rejected)
    assert sorted(why) == [0, 1, 2, 3, 4], r.rejected
    assert "NaN" in why[0] and "flat vector" in why[1] and "assigned" in why[2]
    assert "above the bound" in why[3] and "assigned" in why[4] and "num_samples" in why[4]
    assert r.accepted == [5, 8, 9]
    assert r.dropped == [OOM_CLIENT, NAN_CLIENT]
    reasons = dict(r.dropped_reasons)
    assert "out of memory" in reasons[OOM_CLIENT] and "loss" in reasons[NAN_CLIENT]
    assert any(f"client {OOM_CLIENT}" in m and "out of memory" in m for m in logs)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def impostor(r, u):
    """Replies that are not a ClientUpdate of the client that sent them."""
    if u.client == 0:
        return {"client": 0, "values": u.values}
    if u.client == 1:
        return ClientUpdate([1], u.switch, u.values, u.num_samples)  # an id that is not even hashable
    if u.client == 2:
        return ClientUpdate(99, u.switch, u.values, u.num_samples)   # a client that does not exist
    if u.client == 3:
        return ClientUpdate(8, u.switch, u.values, u.num_samples)    # another selected client
    if u.client == 4:
        return ClientUpdate(4, u.switch, u.values, np.uint64(2 ** 63))
    if u.client == 5:
        return ClientUpdate(5, u.switch, u.values, torch.tensor([1.0, 2.0]))
    return u


@pytest.mark.parametrize("rule", RULES)
def test_replies_that_are_not_the_senders_update_are_rejected(digits, rule):
    train, test = digits
    clients = ten_clients(train)
    h = simulate(flaky_net(), train, test, clients, rule, rounds=1, local_epochs=1, lr=0.1, batch_size=32,
                 seed=3, progress=False, calib_set=test, fault_fn=impostor)
    r = h.rounds[0]
    why = dict(r.rejected)
    assert sorted(why) == [0, 1, 2, 3, 4, 5] and r.accepted == [6, 7, 8, 9], r.rejected
    assert "not a ClientUpdate" in why[0] and "names client" in why[1] and "names client 99" in why[2]
    assert "names client 8" in why[3] and "above the bound" in why[4] and "num_samples" in why[5]


@pytest.mark.parametrize("rule", RULES)
def test_huge_finite_updates_do_not_overflow_the_model(digits, rule):
    """Two clients send 3e38 everywhere (finite); their float32 weighted sum is inf."""
    train, test = digits

    def huge(r, u):
        if u.client in (8, 9):
            return ClientUpdate(u.client, u.switch, torch.full_like(u.values, 3e38), u.num_samples)
        return u

    net = flaky_net()
    h = simulate(net, train, test, ten_clients(train), rule, rounds=1, local_epochs=1, lr=0.1, batch_size=32,
                 seed=3, progress=False, calib_set=test, fault_fn=huge)
    assert {8, 9} <= set(h.rounds[0].accepted) and not h.rounds[0].rejected
    params = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.isfinite(params).all() and params.abs().max() > 1e37


def test_fedavg_round_is_the_sample_mean_of_the_good_updates(digits):
    """The aggregate after a round with bad clients, element by element, from the updates."""
    (X, Y), test = digits
    X = X.clone()
    clients = ten_clients((X, Y))
    len_of.clear()
    len_of.update({c.id: len(c.indices) for c in clients})
    X[clients[OOM_CLIENT].indices] = OOM
    X[clients[NAN_CLIENT].indices] = float("nan")
    net = flaky_net()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    sent = {}

    def record(r, u):
        sent[u.client] = (u.values.clone(), float(len_of[u.client]))
        return poison(r, u)

    h = simulate(net, (X, Y), test, clients, "fedavg", rounds=1, local_epochs=1, lr=0.1, batch_size=32,
                 seed=3, progress=False, calib_set=test, fault_fn=record)
    assert h.rounds[0].accepted == [5, 8, 9]
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    # every client sent the same [0.5] elements; the accepted ones average, weighted by samples
    num = sum(sent[c][1] * sent[c][0].double() for c in (5, 8, 9))
    want = (num / sum(sent[c][1] for c in (5, 8, 9))).float()
    pos = _positions(net, want.numel())
    torch.testing.assert_close(after[pos], want, rtol=1e-5, atol=1e-7)
    rest = torch.ones_like(before, dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(after[rest], before[rest])


def _positions(net, n):
    """Flat positions of the [0.5] prefix windows, parameter by parameter, window order."""
    from slimkern.nn import parameter_ranges
    wins = parameter_ranges(net, Switch([0.5]), buffers=False)
    out, offset = [], 0
    for name, p in net.named_parameters():
        idx = torch.arange(p.numel()).view(p.shape)
        if name in wins:
            out.append(idx[wins[name][0]].flatten() + offset)
        offset += p.numel()
    pos = torch.cat(out)
    assert pos.numel() == n
    return pos


def test_update_norm_clipping(digits):
    """max_update_norm: each client's change is scaled to norm <= c before the average."""
    train, test = digits
    clients = ten_clients(train)
    net = flaky_net()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    pos = None
    sent = {}

    def record(r, u):
        sent[u.client] = (u.values.clone(), float(len(clients[u.client].indices)))
        return u

    c = 0.05
    simulate(net, train, test, clients, "fedavg", rounds=1, local_epochs=1, lr=0.1, batch_size=32, seed=3,
             progress=False, calib_set=test, fault_fn=record, max_update_norm=c)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    pos = _positions(net, next(iter(sent.values()))[0].numel())
    old = before[pos].double()
    num = den = 0.0
    for v, n in sent.values():
        delta = v.double() - old
        norm = float(delta.norm())
        assert norm > c  # the clipping matters
        num = num + n * delta * (c / norm)
        den += n
    want = (old + num / den).float()
    torch.testing.assert_close(after[pos], want, rtol=1e-5, atol=1e-7)
    rest = torch.ones_like(before, dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(after[rest], before[rest])


def test_update_norm_clipping_of_a_masked_update(digits):
    """A masked update (full-size values + mask) is clipped too: one client moves every
    element of its [0.5] windows by +1, so its change has norm sqrt(N) and is scaled to c."""
    from slimkern.nn import parameter_ranges
    train, test = digits
    clients = ten_clients(train)
    net = flaky_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    wins = parameter_ranges(net, Switch([0.5]), buffers=False)
    mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in before.items()}
    for n, ws in wins.items():
        if n in mask:
            for w in ws:
                mask[n][w] = True
    N = sum(int(m.sum()) for m in mask.values())

    def masked(r, u):
        vals = {n: torch.where(mask[n], before[n] + 1.0, before[n]) for n in before}
        return ClientUpdate(u.client, u.switch, vals, u.num_samples, mask=mask)

    c = 0.5
    h = simulate(net, train, test, clients, "fedavg", rounds=1, clients_per_round=1, local_epochs=1, lr=0.1,
                 batch_size=32, seed=3, progress=False, calib_set=test, fault_fn=masked, max_update_norm=c)
    assert len(h.rounds[0].accepted) == 1
    for n, p in net.named_parameters():
        want = torch.where(mask[n], before[n] + c / N ** 0.5, before[n])
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)


def test_make_clients_gives_every_tier_a_client():
    tiers = parse_tiers("a=1.0:0.1,b=0.5:0.1,c=0.25:0.8")
    cl = make_clients(np.arange(40) % 10, tiers, 4, "iid", seed=0)
    counts = {t: sum(c.tier == t for c in cl) for t in "abc"}
    assert counts == {"a": 1, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="3 tiers"):
        make_clients(np.arange(40) % 10, tiers, 2, "iid", seed=0)


# -- the command line: one line, exit code 2, never a traceback -----------------------------

def test_cli_tier_that_rounds_to_no_client_runs(tmp_path, capsys):
    from slimkern.cli import main
    rc = main(["fl", "--strategy", "heterofl", "--clients", "4", "--rounds", "1", "--local-epochs", "1",
               "--tiers", "a=1.0:0.1,b=0.5:0.1,c=0.25:0.8", "--channels", "4", "8", "8", "--partition", "iid",
               "--eval-every", "1", "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0",
               "--out", str(tmp_path / "run"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    import json
    rows = json.load(open(tmp_path / "run" / "report.json"))["strategies"]["heterofl"]
    assert [r["tier"] for r in rows] == ["a", "b", "c"]


@pytest.mark.parametrize("exc", [KeyError("a"), RuntimeError("kernel failed\nat line 3"), ZeroDivisionError(),
                                 OSError(28, "No space left on device")])
def test_cli_reports_any_error_as_one_line(tmp_path, capsys, monkeypatch, exc):
    import slimkern.fl.demo as demo
    from slimkern.cli import main

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(demo, "run_fl_demo", boom)
    for argv in (["fl", "--out", str(tmp_path / "x"), "--no-progress"], ["demo", "--out", str(tmp_path / "y")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slimkern "), err
        assert type(exc).__name__ in lines[0] or str(exc) in lines[0]


@pytest.mark.parametrize("argv", [["fl", "--rounds", "abc"], ["fl", "--no-such-flag"], ["fl", "--lr"]])
def test_cli_bad_flags_are_one_line(argv, capsys):
    from slimkern.cli import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimkern fl: error:"), err
