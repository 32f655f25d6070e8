"""`slimkern search` killed (SIGKILL) while it records a finished job.

The child runs the real command line with ``os.replace`` wrapped: at the K-th replace onto a
``jobs/*.json`` record the new record is complete in its temporary file and the process kills
itself before the rename -- the last moment at which the old state is still the visible one.
After it the finished jobs still parse, and a rerun (the search resumes from its job records)
ends with the same found configurations and Table-2 rows as an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import os, re, signal, sys
    kill_at, pattern = int(os.environ.get("KILL_AT", "0")), re.compile(os.environ.get("KILL_MATCH", "$^"))
    calls = [0]
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if kill_at and pattern.search(os.fspath(dst)):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    from slimkern import cli
    sys.exit(cli.main(sys.argv[1:]))
""")

ARGS = ["search", "ows", "--seeds", "0", "--settings", "S", "--variants", "U", "--search-epochs", "1",
        "--warmup", "0", "--retrain-epochs", "1", "--calibrate-batches", "2", "--no-progress"]


def run_cli(args, kill_at=0, match=r"jobs/[^/]+\.json$", timeout=600):
    env = dict(os.environ, KILL_AT=str(kill_at), KILL_MATCH=match, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_search_killed_while_recording_a_job_resumes_to_the_same_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(ARGS + ["--out", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]

    r = run_cli(ARGS + ["--out", str(killed)], kill_at=2)  # the second job's record
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    records = sorted((killed / "jobs").glob("*.json"))
    assert len(records) == 1  # the first job's record, whole
    json.loads(records[0].read_text())
    assert not (killed / "found.json").exists()

    r = run_cli(ARGS + ["--out", str(killed)])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("found.json", "table2.json"):
        a, b = (json.loads((d / name).read_text()) for d in (full, killed))
        if name == "found.json":
            strip = lambda d: [{k: v for k, v in c.items() if k != "seconds"} for c in d["configurations"]]  # noqa
            assert strip(a) == strip(b)
        else:
            assert [r["top1"] for r in a["rows"]] == [r["top1"] for r in b["rows"]]


PRUNE = ["prune", "dac", "--width-mult", "0.25", "--last-channels", "16", "--image-size", "8", "--clients", "2",
         "--rounds", "1", "--batch-size", "64", "--budgets", "macs_ratio=0.9", "--pretrain-epochs", "1",
         "--guard-fraction", "0.6", "--finetune-epochs", "0"]


def test_prune_killed_while_saving_models_leaves_whole_files_and_a_rerun_equals_uninterrupted(tmp_path):
    import torch

    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_cli(PRUNE + ["--out", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(PRUNE + ["--out", str(killed)], kill_at=2, match=r"models/[^/]+\.pt$")  # the second model
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    saved = sorted((killed / "models").glob("*.pt"))
    assert len(saved) == 1
    torch.load(saved[0], weights_only=True)  # whole, and pickle-free
    assert not (killed / "report.json").exists()

    r = run_cli(PRUNE + ["--out", str(killed)])  # prune has no resume: the rerun redoes the run
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    key = lambda rep: [[(c["kind"], c["macs"], c.get("top1")) for c in run["clusters"]] for run in rep["runs"]]  # noqa
    assert key(a) == key(b)
    for p in sorted((full / "models").glob("*.pt")):
        x, y = torch.load(p, weights_only=True), torch.load(killed / "models" / p.name, weights_only=True)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not list((killed / "models").glob(".tmp-*")), "the killed write's temporary file was left behind"
