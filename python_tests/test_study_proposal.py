"""slimkern.study: cost measurements against hand counts, and the study commands end to end on
tiny configurations (run folder, report, table, plot, reuse of finished runs, errors)."""
import argparse
import json
import os

import pytest
import torch

from slimkern.study.costs import saved_tensor_bytes, training_memory


def test_saved_tensor_bytes_by_hand():
    x = torch.randn(32, 64)
    w = torch.randn(64, 10, requires_grad=True)
    # x @ w with only w requiring grad saves x (for dL/dw = x^T g): 32 * 64 floats
    assert saved_tensor_bytes(lambda: (x @ w).sum()) == 32 * 64 * 4
    # relu(x @ w): also its output (10 x 32 floats) for relu's backward
    assert saved_tensor_bytes(lambda: torch.relu(x @ w).sum()) == 32 * 64 * 4 + 32 * 10 * 4
    x2 = x.clone().requires_grad_(True)
    # both require grad: x and w saved, a tensor saved twice counted once
    assert saved_tensor_bytes(lambda: (x2 @ w).sum() + (x2 @ w).sum()) == 32 * 64 * 4 + 64 * 10 * 4
    # parameters are counted apart: a saved view of w (a slice, as slim layers save) is left out
    assert saved_tensor_bytes(lambda: (x2 @ w[:, :5]).sum(), exclude=[w]) == 32 * 64 * 4


def test_training_memory_grows_with_width_and_nested_switches():
    import slimkern as sk
    from slimkern.fl.models import small_cnn
    from slimkern.fl.rules import get_rule
    net = small_cnn(10, 1, (8, 16, 8))
    rule = get_rule("fedavg")
    half = training_memory(net, rule, sk.Switch.width(0.5), 8, (1, 8, 8), 100)
    full = training_memory(net, rule, sk.Switch.width(1.0), 8, (1, 8, 8), 100)
    assert half < full
    assert training_memory(net, rule, sk.Switch.width(1.0), 8, (1, 8, 8), 200) == full + 3 * 100 * 4
    paradis = get_rule("paradis")
    paradis.client_switch(sk.Switch.width(1.0), [sk.Switch.width(0.5), sk.Switch.width(1.0)])
    nested = training_memory(net, paradis, sk.Switch.width(1.0), 8, (1, 8, 8), 100)
    assert nested > full  # the [0.5] switch distilled in the same packed pass
    # the [0.5] slice of the shared net holds what a distinct 0.5x model holds (same layers, no
    # full-width weights): equal activation bytes
    small = small_cnn(10, 1, (4, 8, 4))
    assert training_memory(small, rule, sk.Switch.width(1.0), 8, (1, 8, 8), 100) == half


@pytest.mark.slow
def test_proposal_study_tiny_end_to_end(tmp_path):
    from slimkern.study.proposal import PROPOSAL, run_proposal
    out = str(tmp_path / "study")
    cfg = dict(PROPOSAL, seeds=[0], alphas=[1.0], methods=["distinct+feddf", "heterofl+feddf", "otfusion"],
               rounds=1, clients=6, local_epochs=1, distill_steps=2, eval_every=1, workers=1, out=out)
    rep = run_proposal(cfg, log=lambda m: None)
    for f in ("report.json", "results.csv", "summary.csv", "table.md", "proposal.png", "config.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert len(rep["summary"]) == 3 * 3
    rows = {(r["method"], r["tier"]): r for r in rep["summary"]}
    # stored on the server: three distinct models vs one shared net (small_cnn 32-64-16: 28330 params)
    assert rows[("heterofl+feddf", "full")]["server_params"] == 28330
    assert rows[("distinct+feddf", "full")]["server_params"] > 28330
    # the same architecture at each tier: equal inference MACs for distinct models and shared slices
    for t in ("full", "half", "quarter"):
        assert rows[("distinct+feddf", t)]["inference_MACs"] == rows[("otfusion", t)]["inference_MACs"]
    assert rows[("heterofl+feddf", "full")]["server_MMACs_per_round"] > rows[("otfusion", "full")][
        "server_MMACs_per_round"]
    with open(os.path.join(out, "report.json")) as fh:
        assert json.load(fh)["config"]["rounds"] == 1
    # finished runs are reused
    before = os.path.getmtime(os.path.join(out, "runs", "otfusion-alpha1.0-seed0.json"))
    run_proposal(cfg, log=lambda m: None)
    assert os.path.getmtime(os.path.join(out, "runs", "otfusion-alpha1.0-seed0.json")) == before


@pytest.mark.slow
def test_otfusion_oneshot_tiny(tmp_path):
    from slimkern.study.otfusion_oneshot import run_otfusion_oneshot
    rep = run_otfusion_oneshot(seeds=(0,), channels=(8, 16, 8), epochs=1, out=str(tmp_path), log=lambda m: None)
    s = rep["summary"]
    assert "A+B vanilla average" in s and "S+A OT into 0.5x (weights) +BN recal" in s
    assert all(0 <= v["mean"] <= 1 for v in s.values())
    assert os.path.getsize(tmp_path / "otfusion.png") > 0


def test_cli_errors_are_one_line(capsys, tmp_path):
    from slimkern.study.cli import add_study_parser, cmd_study
    parser = argparse.ArgumentParser()
    add_study_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "proposal", "--methods", "bogus", "--out", str(tmp_path)])
    assert cmd_study(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown methods ['bogus']" in err
    args = parser.parse_args(["study", "proposal", "--tiers", "full=[0.5,0.5]:1.0", "--out", str(tmp_path)])
    assert cmd_study(args) == 2
    assert "one-branch prefix width" in capsys.readouterr().err
