"""`slimkern fl` end to end on a tiny config, and its errors."""
import json
import os

import pytest
import torch

from slimkern.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fl_command_writes_run_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = main(["fl", "--strategy", "paradis", "heterofl", "--clients", "4", "--rounds", "1",
               "--tiers", "big=1.0:0.5,pair=[0.5,0.5]:0.5", "--channels", "4", "8", "8", "--local-epochs", "1",
               "--eval-every", "1", "--partition", "shards", "--classes-per-client", "3",
               "--out", out, "--no-progress"])
    assert rc == 0
    for f in ("config.json", "report.json", "report.csv", "history.json", "log.txt", "fl_accuracy.png",
              "checkpoint-paradis.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    rep = json.load(open(os.path.join(out, "report.json")))
    rows = rep["strategies"]["paradis"]
    assert [(r["tier"], r["switch"]) for r in rows] == [("big", "[1.0]x"), ("pair", "[0.5, 0.5]x")]
    assert [r["switch"] for r in rep["strategies"]["heterofl"]] == ["[1.0]x", "[0.5]x"]
    for r in rows:
        assert 0.0 <= r["top1"] <= 1.0 and r["bytes"] == r["bytes_down"] + r["bytes_up"] > 0
    assert "paradis" in capsys.readouterr().out


def test_fl_command_errors(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["fl", "--tiers", "1.0:0.5", "--out", out]) == 2
    assert "tier fractions sum to 0.5" in capsys.readouterr().err
    assert main(["fl", "--strategy", "fedprox", "--out", out]) == 2
    assert "unknown strategy ['fedprox']" in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("roundz: 3\n")
    assert main(["fl", "--config", str(bad), "--out", out]) == 2
    assert "unknown keys ['roundz']" in capsys.readouterr().err


def test_demo_help_lists_fl(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "fl" in capsys.readouterr().out
