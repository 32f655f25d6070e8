"""Budgets drive tiers (issue 13, point 6): tiers given as device budgets get their switch
from ``assign_switch`` on the net's profile, in ``simulate`` and in ``slimkern fl``; the
one-model helper ``slimkern.choose_switch``. Expected switches are found here by brute
force over the candidates, from ``slimkern.profile``'s per-branch numbers."""
import json

import numpy as np
import pytest
import torch

import slimkern
from slimkern import Switch
from slimkern.fl import make_clients, parse_tiers, simulate
from slimkern.fl.budget import Budget, parse_budget
from slimkern.fl.models import small_cnn

INPUT = (1, 1, 8, 8)
WIDTHS = [i / 8 for i in range(1, 9)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def branch_numbers(net, sw):
    """(macs, params, memory) per branch, memory = 4 bytes per parameter + peak activations."""
    prof = slimkern.profile(net, sw, input_size=INPUT)
    return [(b.macs, b.params, 4 * b.params + b.peak_activation_bytes) for b in prof.branches]


def test_parse_budget_units_and_errors():
    assert parse_budget("macs=2.5M,params=20k,memory=1MiB,devices=2") == Budget(
        macs=2.5e6, params=2e4, devices=2, memory=2 ** 20)
    assert parse_budget("memory=64KB") == Budget(memory=64000.0)
    assert parse_budget(" params = 3e4 ") == Budget(params=3e4)
    for bad, msg in [("macs=abc", "not a number"), ("foo=1", "unknown key 'foo'"), ("devices=1.5", "whole number"),
                     ("devices=2", "limits nothing"), ("macs=1Q", "unknown unit"), ("macs=1,macs=2", "given twice"),
                     ("macs", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_budget(bad)


def test_parse_tiers_takes_switches_and_budgets():
    tiers = parse_tiers("phone={macs=2M,devices=2}:0.5,full=1.0:0.3,{params=5k}:0.2")
    assert [(t.name, t.switch, t.fraction, t.budget) for t in tiers] == [
        ("phone", None, 0.5, Budget(macs=2e6, devices=2)), ("full", Switch([1.0]), 0.3, None),
        ("{params=5k}", None, 0.2, Budget(params=5e3))]
    with pytest.raises(ValueError, match="unknown key"):
        parse_tiers("a={watts=3}:1.0")
    with pytest.raises(ValueError, match="sum to 0.5"):
        parse_tiers("a={macs=1M}:0.5")


def test_choose_switch_is_public_and_picks_the_largest_fitting_width():
    net = small_cnn(channels=(8, 16, 16), seed=0)
    half = branch_numbers(net, Switch([0.5]))[0]
    budget = Budget(macs=half[0] * 1.05)
    # brute force: the one-branch width with the most MACs within the budget
    fitting = [(branch_numbers(net, Switch([w]))[0][0], w) for w in WIDTHS
               if branch_numbers(net, Switch([w]))[0][0] <= budget.macs]
    want = Switch([max(fitting)[1]])
    assert slimkern.choose_switch(net, budget, INPUT) == want == Switch([0.5])
    assert slimkern.choose_switch(net, "macs=%r" % (half[0] * 1.05), INPUT) == want
    cands = [Switch([1.0]), Switch([0.25])]
    assert slimkern.choose_switch(net, budget, INPUT, cands) == Switch([0.25])


def test_memory_budget_is_parameter_bytes_plus_peak_activations():
    net = small_cnn(channels=(8, 16, 16), seed=0)
    cands = [Switch([1.0]), Switch([0.5]), Switch([0.25]), Switch([0.5, 0.5])]
    mem = {str(s): branch_numbers(net, s) for s in cands}
    half = mem["[0.5]x"][0][2]
    assert slimkern.choose_switch(net, Budget(memory=half * 1.0001), INPUT, cands) == Switch([0.5])
    assert slimkern.choose_switch(net, Budget(memory=half * 0.9999), INPUT, cands) == Switch([0.25])
    # two devices, each holding one branch of [0.5, 0.5] (the larger of its two branches)
    per_dev = max(b[2] for b in mem["[0.5, 0.5]x"])
    assert per_dev < mem["[1.0]x"][0][2]
    assert slimkern.choose_switch(net, Budget(memory=per_dev * 1.0001, devices=2), INPUT, cands) == Switch([0.5, 0.5])
    with pytest.raises(ValueError, match="no candidate switch fits"):
        slimkern.choose_switch(net, Budget(memory=10.0), INPUT, cands)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    g = np.random.default_rng(0).permutation(len(Y))
    return (X[g[:200]], Y[g[:200]]), (X[g[1500:1600]], Y[g[1500:1600]])


def _pair_budget(channels):
    net = small_cnn(channels=channels, seed=0)
    return branch_numbers(net, Switch([0.5]))[0][0] * 1.001


def expected_two_device_switch(channels, macs):
    """Brute force over one-branch widths and equal two-way splits, one branch per device."""
    net = small_cnn(channels=channels, seed=0)
    best = None
    for sw in [Switch([w]) for w in WIDTHS] + [Switch([w, w]) for w in WIDTHS if 2 * w <= 1]:
        br = branch_numbers(net, sw)
        if all(m <= macs for m, _, _ in br):
            key = (sum(m for m, _, _ in br), sum(p for _, p, _ in br), -len(br))
            best = max(best or (key, sw), (key, sw), key=lambda t: t[0])
    return best[1]


@pytest.mark.parametrize("strategy,trains", [("paradis", "[0.5, 0.5]x"), ("heterofl", "[0.5]x")])
def test_simulate_chooses_the_switch_of_budget_tiers(data, strategy, trains):
    train, test = data
    macs = _pair_budget((8, 16, 16))
    assert expected_two_device_switch((8, 16, 16), macs) == Switch([0.5, 0.5])
    tiers = parse_tiers(f"big=1.0:0.5,pair={{macs={macs!r},devices=2}}:0.5")
    clients = make_clients(train[1].numpy(), tiers, 4, "iid", seed=0)
    assert {c.tier_switch for c in clients if c.tier == "pair"} == {None}
    logs = []
    h = simulate(small_cnn(channels=(8, 16, 16), seed=1), train, test, clients, strategy, rounds=1, lr=0.1,
                 batch_size=32, seed=0, progress=False, log=logs.append)
    assert h.tiers == {"big": "[1.0]x", "pair": trains}
    assert any("pair" in m and "[0.5, 0.5]x" in m for m in logs)


def test_cli_tiers_accept_budgets(tmp_path, capsys):
    from slimkern.cli import main
    macs = _pair_budget((4, 8, 8))
    out = str(tmp_path / "run")
    argv = ["fl", "--strategy", "paradis", "--clients", "4", "--rounds", "1", "--local-epochs", "1",
            "--channels", "4", "8", "8", "--partition", "iid", "--eval-every", "1", "--out", out, "--no-progress",
            "--aug-rotate", "0", "--aug-translate", "0", "--aug-scale", "0"]
    assert main(argv + ["--tiers", f"big=1.0:0.5,pair={{macs={macs!r},devices=2}}:0.5"]) == 0
    rows = json.load(open(f"{out}/report.json"))["strategies"]["paradis"]
    assert [(r["tier"], r["switch"]) for r in rows] == [("big", "[1.0]x"), ("pair", "[0.5, 0.5]x")]
    capsys.readouterr()
    assert main(argv + ["--tiers", "big=1.0:0.5,tiny={macs=10}:0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny" in err[0] and "no candidate switch fits" in err[0]
    with pytest.raises(SystemExit):
        main(["fl", "--help"])
    assert "{macs=" in capsys.readouterr().out
