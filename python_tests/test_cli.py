"""The `slimkern` command line end to end on a tiny config, and its errors."""
import json
import os
import subprocess
import sys

import pytest

from slimkern import cli
from slimkern.config import ConfigError, load_config, merge

TINY = """\
model: resnet20
width_mult: 0.25
max_width: 1.5
image_size: 8
channels: 1
recipe: paradis
switches: ["[1.5]x", "[1.0]x", "[0.5, 0.5]x"]
eval_switches: ["[0.5, 0.25, 0.25]x"]
individual: ["[0.5, 0.5]x"]
epochs: 1
batch_size: 128
calibrate_batches: 2
eval_batch_size: 512
progress: false
threads: 1
"""


def test_cli_train_eval_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.05"])
    assert rc == 0
    for f in ("config.yaml", "train.log", "checkpoint.pt", "report.json", "report.csv", "plot.png"):
        assert (out / f).is_file(), f
    assert len(list(out.glob("individual-*.pt"))) == 1
    rep = json.loads((out / "report.json").read_text())
    sw = {(r["switch"], r["kind"]): r for r in rep["switches"]}
    assert set(sw) == {("[1.5]x", "shared"), ("[1.0]x", "shared"), ("[0.5, 0.5]x", "shared"),
                       ("[0.5, 0.25, 0.25]x", "shared"), ("[0.5, 0.5]x", "individual")}
    assert sw["[0.5, 0.25, 0.25]x", "shared"]["trained"] is False and sw["[1.0]x", "shared"]["trained"] is True
    assert all(0.0 <= r["top1"] <= 1.0 and r["macs"] > 0 and r["params"] > 0 for r in rep["switches"])
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["model"] == "resnet20"  # the flag won over the (default) file value
    assert "[0.5, 0.5]x" in capsys.readouterr().out
    # re-evaluate the checkpoint
    assert cli.main(["eval", "--run", str(out), "--switches", "[1.0]x", "[0.25, 0.75]", "--no-progress"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert [r["switch"] for r in ev["switches"]] == ["[1.0]x", "[0.25, 0.75]x"]
    # export a switch of the run: one plain module per device
    assert cli.main(["export", "--run", str(out), "--switch", "[0.5, 0.5]x"]) == 0
    branches = sorted((out / "export").glob("*/branch?.pt2"))
    assert len(branches) == 2
    import torch
    b0 = torch.export.load(branches[0]).module()
    assert not any(type(m).__module__.startswith("slimkern") for m in b0.modules())
    torch.load(branches[0].with_name("branch0.state_dict.pt"), weights_only=True)


def test_python_dash_m_slimkern_help():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))))
    r = subprocess.run([sys.executable, "-m", "slimkern", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "train" in r.stdout


def test_help_names_every_registered_command():
    """The usage line and the command list of `slimkern -h` name every command the parser
    registers (a fixed metavar once hid sr, scaling, deploy and study)."""
    import argparse
    import re

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    assert {"train", "fl", "search", "prune", "sr", "scaling", "deploy", "paradis", "study"} <= set(commands)
    text = parser.format_help()
    usage = re.search(r"\{([a-z,]+)\}", text).group(1).split(",")
    assert usage == commands
    listed = re.findall(r"^    (\w+)\s", text, flags=re.M)  # one help line per command
    assert listed == commands


def test_malformed_and_unknown_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [resnet20\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"malformed config .*bad.yaml"):
        load_config(bad)
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "malformed config" in capsys.readouterr().err
    toml = tmp_path / "bad.toml"
    toml.write_text("lr = = 0.1\n")
    with pytest.raises(ConfigError, match="malformed config"):
        load_config(toml)
    unk = tmp_path / "unk.toml"
    unk.write_text('lr = 0.1\nlearning_rate = 0.2\n')
    assert cli.main(["train", "--config", str(unk)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['learning_rate']" in err
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="must be a number"):
        merge({"lr": 0.1}, {"lr": "fast"}, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "no-cifar"),
                   "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no-cifar" in err and "never downloads" in err
    assert cli.main(["train", "--dataset", "cifar10", "--out", str(tmp_path / "r")]) == 2
    assert "needs --data-root" in capsys.readouterr().err
    assert cli.main(["train", "--switches", "[0.5, 0.6]", "--out", str(tmp_path / "r")]) == 2
    assert "switch" in capsys.readouterr().err


def test_same_seed_same_run(tmp_path):
    # The model's initial weights come from --seed too: two runs in one process (different
    # global RNG states in between) end with identical weights; another seed differs.
    import torch

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace('individual: ["[0.5, 0.5]x"]', "individual: []"))
    states = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        torch.rand(7)  # move the global RNG between runs
        assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / name), "--seed", seed]) == 0
        states.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"])
    a, b, c = states
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert a.keys() == b.keys() and len(tensors) > 10
    assert all(torch.equal(a[k], b[k]) for k in tensors)
    tensors = [k for k in tensors if a[k].is_floating_point()]
    assert tensors and not all(torch.equal(a[k], c[k]) for k in tensors)


@pytest.mark.parametrize("finished", [False, True])
def test_failed_experiment_command_leaves_no_half_written_folder(tmp_path, monkeypatch, finished):
    # search / prune / sr / scaling / paradis / study: a failure removes the run folder the
    # command created unless it holds a finished result (reruns skip finished jobs).
    from slimkern import cli
    from slimkern.prune import cli as prune_cli

    out = tmp_path / "run"

    def failing(args):
        os.makedirs(args.out)
        (out / "report.json.tmp123").write_text("{")
        if finished:
            (out / "job0.json").write_text("{}")
        raise RuntimeError("late failure")

    monkeypatch.setattr(prune_cli, "cmd_prune", failing)
    with pytest.raises(RuntimeError, match="late failure"):
        cli.main(["prune", "dac", "--out", str(out)])
    assert out.exists() == finished


def test_pack_option(tmp_path, capsys, monkeypatch):
    """``--pack auto|on|off`` reaches the trainer; anything else is a clear error before any work,
    and an unquoted YAML ``off`` (a boolean to YAML) is told to quote it."""
    from slimkern import runner
    from slimkern.train import ParaDiSTrainer

    assert [runner.pack_value(v) for v in ("auto", "on", "OFF", "true", "false", True, False)] == \
        ["auto", True, False, True, False, True, False]
    assert cli.main(["train", "--pack", "sometimes", "--out", str(tmp_path / "r")]) == 2
    assert "pack must be auto, on or off" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("pack: off\n")
    assert cli.main(["train", "--config", str(unquoted), "--out", str(tmp_path / "r")]) == 2
    assert 'quote the value (e.g. pack: "off")' in capsys.readouterr().err
    seen = []
    real_init = ParaDiSTrainer.__init__

    def spy(self, *a, **k):
        seen.append(k["pack"])
        real_init(self, *a, **k)

    monkeypatch.setattr(ParaDiSTrainer, "__init__", spy)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("individual: [\"[0.5, 0.5]x\"]\n", "").replace("eval_switches: [\"[0.5, 0.25, 0.25]x\"]\n", ""))
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "off"), "--pack", "off"]) == 0
    assert seen == [False]
