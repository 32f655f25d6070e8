"""Commands that fail: before any work for a bad config (naming the key), with the value the
user typed, and without leaving a half-written run folder behind."""
import pytest

from slimkern import cli


@pytest.mark.parametrize("text, key, what", [
    ("lr: 0.1\nlearning_rate: 0.2\n", "learning_rate", "unknown option"),
    ("epochs: ten\n", "epochs", "must be a number"),
    ("augment: 3\n", "augment", "true or false"),
    ("switches: {a: 1}\n", "switches", "must be a list"),
    ("model: 5\n", "model", "must be a string"),
])
@pytest.mark.parametrize("ext", ["yaml", "toml"])
def test_bad_config_fails_before_work_naming_the_key(tmp_path, capsys, text, key, what, ext):
    if ext == "toml":
        text = "\n".join(line.replace(": ", " = ").replace("{a = 1}", "{a = 1}").replace("ten", '"ten"')
                         for line in text.splitlines()) + "\n"
    cfg = tmp_path / f"bad.{ext}"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and what in err, err
    assert not out.exists()


@pytest.mark.parametrize("typed, shown", [("abc", "'abc'"), ("[0.5, oops]", "'[0.5, oops]'"), ("0.5y", "'0.5y'")])
def test_cli_errors_echo_what_the_user_typed(tmp_path, capsys, typed, shown):
    assert cli.main(["train", "--switches", typed, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert shown in err, err
    assert f"{typed}x'" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, typed", [("--switches", "[1.5]"), ("--switches", "[0.5, 0.6]"),
                                         ("--eval-switches", "[1.25]x")])
def test_a_switch_above_max_width_is_reported_as_such(tmp_path, capsys, flag, typed):
    args = ["train", flag, typed, "--out", str(tmp_path / "r")]
    if flag != "--switches":
        args += ["--switches", "[1.0]x"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "above --max-width 1" in err and repr(typed) in err, err
    assert "must be among the switches" not in err


def test_a_command_that_fails_after_creating_its_folder_removes_it(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "none"), "--out", str(out),
                   "--no-progress"])
    assert rc == 2 and "never downloads" in capsys.readouterr().err
    assert not out.exists()
    # a folder the user already had is left alone
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "none"), "--out", str(out),
                     "--no-progress"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
