"""benchmarks/gpu_check.py (``make gpu-check``): harmless without a GPU, bounded with one.

Without a CUDA device the script must say so and exit 0 having run nothing; its steps are
checked as data (the build asks for CUDA for the present GPU's architecture, every result
lands in benchmarks/results/gpu_*.json) and a step that overruns its budget is stopped and
recorded, not waited for.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    summary = os.path.join(ROOT, "benchmarks", "results", "gpu_check.json")
    before = os.path.getmtime(summary) if os.path.exists(summary) else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpu-check: skipped" in out.stdout and "Nothing was built or run" in out.stdout
    after = os.path.getmtime(summary) if os.path.exists(summary) else None
    assert after == before  # no summary written, nothing built


def test_arch_list_is_the_device_capability():
    assert gpu_check.arch_list((9, 0)) == "9.0"
    assert gpu_check.arch_list((8, 6)) == "8.6"
    for bad in ((0, 0), (9, -1), (9.0, 0)):
        with pytest.raises(ValueError, match="compute capability"):
            gpu_check.arch_list(bad)


def test_steps_build_cuda_for_the_gpu_and_write_gpu_json():
    plan = gpu_check.steps("python", "8.6", build=True)
    names = [n for n, _, _ in plan]
    assert names == list(gpu_check.CAPS)  # every step has a time cap, in run order
    assert names[:3] == ["build", "info", "pytest_gpu"]
    build_env = plan[0][2]
    assert build_env["FORCE_CUDA"] == "1" and build_env["TORCH_CUDA_ARCH_LIST"] == "8.6"
    outputs = [a.split("=", 1)[-1] for _, argv, _ in plan for a in argv if a.endswith(".json")]
    assert len(outputs) == 3 and all(os.path.basename(p).startswith("gpu_") for p in outputs), outputs
    assert all(os.path.dirname(p) == os.path.join("benchmarks", "results") for p in outputs)
    assert dict((n, e) for n, _, e in plan)["bench_switchable_bn"]["SK_BENCH_DEVICE"] == "cuda"
    assert "--device" in dict((n, a) for n, a, _ in plan)["bench_train_step"]
    assert [n for n, _, _ in gpu_check.steps("python", "8.6", build=False)][0] == "info"
    # the caps alone may exceed the deadline; main() also cuts every step to the time left
    assert max(gpu_check.CAPS.values()) < 470


def test_a_step_over_its_budget_is_stopped_and_recorded():
    rec = gpu_check.run_step("sleepy", [sys.executable, "-c", "import time; time.sleep(30)"], {}, budget=1)
    assert rec["timed_out"] and not rec["ok"] and rec["rc"] in (124, 137)
    assert rec["seconds"] < 15
    ok = gpu_check.run_step("fine", [sys.executable, "-c", "print('hello')"], {}, budget=20)
    assert ok["ok"] and "hello" in ok["output_tail"]


def test_dry_run_prints_every_step():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                          "--arch", "8.0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in gpu_check.CAPS:
        assert name in out.stdout
    assert "TORCH_CUDA_ARCH_LIST=8.0" in out.stdout


def test_main_records_every_step_and_keeps_the_deadline(tmp_path, monkeypatch):
    """The driver loop with a GPU pretended and three stand-in steps: one passes, one fails
    (the next still runs), one would outlast the deadline (stopped); the summary says so and
    the exit status is 1."""
    import torch

    py = sys.executable
    plan = [("info", [py, "-c", "print('built')"], {}),
            ("pytest_gpu", [py, "-c", "import sys; sys.exit(3)"], {}),
            ("bench_train_step", [py, "-c", "import time; time.sleep(60)"], {})]
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "gpu_present", lambda: (True, ""))
    monkeypatch.setattr(gpu_check, "steps", lambda python, arch, build: plan)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    assert gpu_check.main(["--deadline", "20"]) == 1
    import json

    summary = json.load(open(tmp_path / "benchmarks" / "results" / "gpu_check.json"))
    assert summary["device"] == "stand-in GPU" and summary["capability"] == "8.6"
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["info"]["ok"] and "built" in steps["info"]["output_tail"]
    assert not steps["pytest_gpu"]["ok"] and steps["pytest_gpu"]["rc"] == 3
    late = steps["bench_train_step"]
    assert not late["ok"] and (late.get("timed_out") or late.get("skipped"))
    assert summary["seconds"] < 40
