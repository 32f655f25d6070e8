"""Every benchmark script that runs as a command answers ``--help`` with its usage, at once.

A benchmark that ignored its arguments ran for minutes on ``--help`` (bench_switchable_bn.py did,
and on a 2-core machine it then shared the cores with whatever benchmark was running).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _is_command(name: str) -> bool:
    with open(os.path.join(BENCH, name)) as fh:
        return 'if __name__ == "__main__"' in fh.read()


SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.endswith(".py") and _is_command(f))


def test_the_scripts_are_found():
    assert {"bench_switchable_bn.py", "bench_train_step.py", "bench_block_ops.py", "summarize.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_runs_nothing(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.lstrip().startswith("usage:"), out.stdout[:500]
