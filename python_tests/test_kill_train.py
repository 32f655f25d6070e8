"""`slimkern train` killed (SIGKILL) in the middle of a checkpoint write.

The child process runs the real command line; its ``torch.save`` is wrapped so that the K-th
checkpoint write puts half of its bytes into the temporary file, fsyncs them and then SIGKILLs
its own process -- the worst moment for a kill. After it: the previous checkpoint still loads
with ``torch.load(weights_only=True)``, and ``--resume`` ends with exactly the weights and the
report of an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import test_cli

pytestmark = pytest.mark.slow

# test_cli's tiny run, two epochs, no individual baseline, no untrained switch
TINY = test_cli.TINY.replace("epochs: 1", "epochs: 2").replace('individual: ["[0.5, 0.5]x"]', "individual: []") \
    .replace('eval_switches: ["[0.5, 0.25, 0.25]x"]\n', "").replace("batch_size: 128", "batch_size: 256")

# Runs `slimkern <argv>`; with KILL_AT=k the k-th torch.save into a file object writes half of
# its bytes, fsyncs, and the process kills itself with SIGKILL (no cleanup handlers run).
DRIVER = textwrap.dedent("""
    import io, os, signal, sys, torch
    kill_at = int(os.environ.get("KILL_AT", "0"))
    calls = [0]
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if kill_at and hasattr(f, "write"):
            calls[0] += 1
            if calls[0] == kill_at:
                buf = io.BytesIO()
                real_save(obj, buf, *a, **kw)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **kw)

    torch.save = save
    from slimkern import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def run_cli(args, kill_at=0, timeout=300):
    env = dict(os.environ, KILL_AT=str(kill_at), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_same(a, b, where="model"):
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def load_weights_only(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_during_a_checkpoint_write_then_resume_equals_uninterrupted(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(["train", "--config", str(cfg), "--out", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]

    r = run_cli(["train", "--config", str(cfg), "--out", str(killed)], kill_at=2)  # during epoch 2's write
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    ck = load_weights_only(killed / "checkpoint.pt")  # the previous checkpoint is whole
    assert ck["epoch"] == 1
    assert not (killed / "report.json").exists()  # nothing claims the run finished

    r = run_cli(["train", "--config", str(cfg), "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_weights_only(full / "checkpoint.pt"), load_weights_only(killed / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    assert_same(a["model"], b["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert [(s["switch"], s["top1"]) for s in ra["switches"]] == [(s["switch"], s["top1"]) for s in rb["switches"]]
    assert not list(killed.glob(".tmp-*")), "the killed write's temporary file was left behind"


def test_every_file_of_a_run_loads_weights_only_and_exports_run_without_slimkern(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("epochs: 2", "epochs: 1").replace("individual: []", 'individual: ["[0.5, 0.5]x"]')
                   + 'export: ["[0.5, 0.5]x"]\neval_switches: ["[0.5, 0.25, 0.25]x"]\n')
    out = tmp_path / "run"
    r = run_cli(["train", "--config", str(cfg), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    pts = sorted(out.rglob("*.pt"))
    assert len(pts) >= 4
    for p in pts:
        load_weights_only(p)
    pt2 = sorted(out.rglob("*.pt2"))
    assert {p.name for p in pt2} >= {"branch0.pt2", "branch1.pt2", "deployable.pt2"}
    # a deployment needs neither pickle nor slimkern: run the .pt2 programs in a fresh interpreter
    # where importing slimkern fails
    probe = textwrap.dedent(f"""
        import sys, torch
        sys.modules["slimkern"] = None
        x = torch.randn(3, 1, 8, 8)
        folder = {str(pt2[0].parent)!r}
        dep = torch.export.load(folder + "/deployable.pt2").module()
        parts = [torch.export.load(folder + f"/branch{{i}}.pt2").module()(x) for i in range(2)]
        sd = torch.load(folder + "/deployable.state_dict.pt", weights_only=True)
        y = dep(x)
        bias = sd.get("bias")
        want = parts[0] + parts[1] + (bias if bias is not None else 0)
        assert y.shape == (3, 10), y.shape
        assert torch.allclose(y, want, atol=1e-5), (y - want).abs().max()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


    # a switch the run evaluated but did not train: its BN rows are not in the checkpoint, so a
    # plain export is refused (pointing at --calibrate) and --calibrate N exports it
    from slimkern import cli

    untrained = "[0.5, 0.25, 0.25]x"
    assert cli.main(["export", "--run", str(out), "--switch", untrained]) == 2
    assert cli.main(["export", "--run", str(out), "--switch", untrained, "--calibrate", "0"]) == 2
    assert cli.main(["export", "--run", str(out), "--switch", untrained, "--calibrate", "2"]) == 0
    (folder,) = [d for d in (out / "export").iterdir() if "0.25" in d.name]
    assert sorted(p.name for p in folder.glob("branch?.pt2")) == ["branch0.pt2", "branch1.pt2", "branch2.pt2"]
    for p in folder.glob("*.pt"):
        load_weights_only(p)


FL = ["fl", "--strategy", "paradis", "--clients", "4", "--rounds", "3", "--tiers", "big=1.0:0.5,pair=[0.5,0.5]:0.5",
      "--channels", "4", "8", "8", "--local-epochs", "1", "--eval-every", "1", "--no-progress"]


def test_fl_killed_during_a_round_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(FL + ["--out", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(FL + ["--out", str(killed)], kill_at=2)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    ck = load_weights_only(killed / "checkpoint-paradis.pt")  # the previous round's checkpoint is whole
    assert not (killed / "report.json").exists()
    r = run_cli(FL + ["--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_weights_only(full / "checkpoint-paradis.pt"), load_weights_only(killed / "checkpoint-paradis.pt")
    assert a["round"] == b["round"] > ck["round"]
    tensors = lambda d, p="": ({f"{p}{k}": v for k, v in d.items() if isinstance(v, torch.Tensor)} |  # noqa
                               {k2: v2 for k, v in d.items() if isinstance(v, dict)
                                for k2, v2 in tensors(v, f"{p}{k}.").items()})
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and sum(t.numel() for t in ta.values()) > 100
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert [r["top1"] for r in ra["strategies"]["paradis"]] == [r["top1"] for r in rb["strategies"]["paradis"]]
