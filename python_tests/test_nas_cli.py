"""`slimkern search ows` writes a complete run folder; bad options give a clear error."""
import csv
import json
import os

from slimkern.cli import main


def test_search_ows_run_folder(tmp_path, capsys):
    cfg = tmp_path / "nas.yaml"
    cfg.write_text("settings: [S]\nvariants: [U]\n")
    out = tmp_path / "run"
    rc = main(["search", "ows", "--config", str(cfg), "--seeds", "0", "--search-epochs", "1", "--warmup", "0",
               "--retrain-epochs", "1", "--calibrate-batches", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    for f in ("config.json", "found.json", "table2.json", "table2.csv", "channels.png"):
        assert os.path.isfile(out / f), f
    found = json.loads((out / "found.json").read_text())
    jobs = {c["job"] for c in found["configurations"]}
    assert jobs == {"search-ows-seed0", "retrain-slim-U-seed0"}
    for c in found["configurations"]:
        assert 0 < c["budget_percent"] <= 100.0  # every configuration meets its budget (profile's MACs)
    rows = list(csv.DictReader((out / "table2.csv").read_text().splitlines()))
    assert [(r["setting"], r["method"]) for r in rows] == [("S", "Slim-U"), ("S", "OWS-U")]
    t2 = json.loads((out / "table2.json").read_text())
    r0 = t2["rows"][0]
    w = (0.25, 0.005, 0.010, 0.045, 0.130, 0.310, 0.25)  # setting S
    assert abs(r0["weighted_top1"] - sum(a * b for a, b in zip(w, r0["top1"]))) < 1e-9
    assert "OWS-U" in capsys.readouterr().out
    # a rerun finds every job done and only rewrites the reports
    assert main(["search", "ows", "--config", str(cfg), "--seeds", "0", "--search-epochs", "1", "--warmup", "0",
                 "--retrain-epochs", "1", "--out", str(out), "--no-progress"]) == 0


def test_search_bad_options(tmp_path, capsys):
    assert main(["search", "aows", "--settings", "X", "--out", str(tmp_path / "r")]) == 2
    assert "settings: choose from" in capsys.readouterr().err
    assert main(["search", "aows", "--budgets", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert "seven fractions" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\n")
    assert main(["search", "ows", "--config", str(bad)]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_demo_nas_runs_the_small_setting(monkeypatch, tmp_path, capsys):
    import slimkern.nas.experiment as ex

    seen = {}

    def fake(cfg):
        seen.update(cfg)
        return {"summary": [{"setting": "S", "method": "OWS-U", "mean": 90.0, "std": 0.0, "n": 1}], "rows": []}

    monkeypatch.setattr(ex, "run_experiment", fake)
    assert main(["demo", "nas", "--out", str(tmp_path / "d")]) == 0
    assert seen["methods"] == ["slim", "ows", "aows"] and seen["seeds"] == [0] and seen["out"] == str(tmp_path / "d")
    assert seen["settings"] == ["S", "RS", "U"] and seen["search_epochs"] == 3
    assert "| S | **90.00** ± 0.00 |" in capsys.readouterr().out
