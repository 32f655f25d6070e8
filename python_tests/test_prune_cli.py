"""`slimkern prune dac|dwnp`: run folders with report, CSV, plot and loadable weights."""
import csv
import json
import os

import pytest
import torch

import slimkern as sk
from slimkern.cli import main
from slimkern.prune import prune_channels

TINY = ["--width-mult", "0.25", "--last-channels", "16", "--image-size", "8", "--clients", "2", "--rounds", "1",
        "--batch-size", "64"]


def _rebuild(keep):
    net = sk.models.mobilenet_v2(10, 3, width_mult=0.25, last_channels=16).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8))  # a [1.0]x statistics row, so the architecture can be carved
    return prune_channels(net, keep)


def test_prune_dac_run_folder(tmp_path):
    out = tmp_path / "dac"
    rc = main(["prune", "dac", *TINY, "--out", str(out), "--budgets", "macs_ratio=0.9", "--pretrain-epochs", "1",
               "--guard-fraction", "0.6", "--finetune-epochs", "0"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    (run,) = rep["runs"]
    assert [c["kind"] for c in run["clusters"]] == ["dac", "width"]
    rows = list(csv.DictReader(open(out / "clusters.csv")))
    assert len(rows) == 2 and float(rows[0]["macs"]) < 0.9 * run["full"]["macs"]
    assert os.path.getsize(out / "dac.png") > 1000
    assert "| DAC |" in (out / "summary.md").read_text()
    for j, c in enumerate(run["clusters"]):
        sd = torch.load(out / "models" / f"seed0_{c['kind']}_{j}.pt", weights_only=True)
        model = _rebuild(c["keep"])
        model.load_state_dict(sd)  # strict: the kept channels rebuild the saved architecture
        assert sk.profile(model.eval(), input_size=(1, 3, 8, 8)).macs == c["macs"]


def test_prune_dwnp_run_folder(tmp_path):
    out = tmp_path / "dwnp"
    rc = main(["prune", "dwnp", *TINY, "--out", str(out), "--p-server", "0.8", "--p-devices", "0.6", "0.5",
               "--no-base"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    (run,) = rep["runs"]
    rows = list(csv.DictReader(open(out / "devices.csv")))
    assert [r["participant"] for r in rows] == ["server", "device 1", "device 2"]
    for r in rows:
        assert abs(float(r["flops_ratio"]) - float(r["target_ratio"])) <= 0.05 * float(r["target_ratio"])
    assert os.path.getsize(out / "dwnp.png") > 1000
    assert "| device 2 |" in (out / "summary.md").read_text()
    d = run["devices"][1]
    model = _rebuild(d["keep"])
    model.load_state_dict(torch.load(out / "models" / "seed0_p2.pt", weights_only=True))


def test_prune_cli_errors(tmp_path, capsys):
    rc = main(["prune", "dwnp", *TINY, "--out", str(tmp_path / "x"), "--p-server", "0.5", "--p-devices", "0.6"])
    assert rc == 2 and "exceeds the server" in capsys.readouterr().err
    rc = main(["prune", "dac", *TINY, "--out", str(tmp_path / "y"), "--budgets", "macs=100,params_ratio=0.5"])
    assert rc == 2 and "mixes units" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "dac", "--budgets", "macs_ratio"])
