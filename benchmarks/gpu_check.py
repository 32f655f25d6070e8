"""GPU readiness in one command (``make gpu-check``; issue 19, item 6).

On a machine with a CUDA device it, in order, each step bounded by ``timeout`` and all of
them by one deadline (default 470 s, under the 8 minutes the issue allows):

  1. builds the extension with the CUDA kernels for the present GPU (``FORCE_CUDA=1``,
     ``TORCH_CUDA_ARCH_LIST`` from ``torch.cuda.get_device_capability()``), in place;
  2. prints ``python -m slimkern.info`` (what was built, in a fresh process);
  3. runs ``pytest -m gpu`` (the C++ CUDA kernels and the public ops on CUDA tensors);
  4. benchmarks on CUDA with small rounds: the block ops (bench_block_ops_gpu.py), switchable
     BN + ReLU (bench_switchable_bn.py, SK_BENCH_DEVICE=cuda) and the ParaDiS / sandwich
     training steps (bench_train_step.py --device cuda), JSON under benchmarks/results/gpu_*.json;
  5. runs the Triton tests on CUDA tensors (``pytest -m triton`` without TRITON_INTERPRET)
     with whatever time is left.

A failed step is recorded and the next one still runs; the summary (device, versions, each
step's command, exit status, seconds and output tail) goes to benchmarks/results/gpu_check.json
and the exit status is 1 when any step failed. Without a CUDA device (or with a CPU-only
torch) it says so and exits 0, so it is harmless in CI. ``--dry-run`` prints the steps.

    python benchmarks/gpu_check.py [--no-build] [--deadline 470] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")

# (name, seconds at most): the order they run in; a step gets min(cap, time left to the deadline)
CAPS = {"build": 240, "info": 30, "pytest_gpu": 120, "bench_block_ops": 120, "bench_switchable_bn": 60,
        "bench_train_step": 90, "pytest_triton": 120}


def gpu_present() -> tuple[bool, str]:
    """(usable, why not): a CUDA build of torch and at least one visible device."""
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, ""


def arch_list(capability: tuple[int, int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for a device of compute capability ``(major, minor)``: ``"9.0"``."""
    major, minor = capability
    if not (isinstance(major, int) and isinstance(minor, int) and major > 0 and minor >= 0):
        raise ValueError(f"a compute capability is a pair of ints (major >= 1, minor >= 0), got {capability!r}")
    return f"{major}.{minor}"


def steps(python: str, arch: str, build: bool) -> list[tuple[str, list[str], dict]]:
    """(name, argv, extra environment) of every step, in order."""
    res = RESULTS
    out = []
    if build:
        out.append(("build", [python, "setup.py", "build_ext", "--inplace"],
                    {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch,
                     "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))}))
    out += [
        ("info", [python, "-m", "slimkern.info"], {}),
        ("pytest_gpu", [python, "-m", "pytest", "python_tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"], {}),
        ("bench_block_ops", [python, "-m", "pytest", "benchmarks/bench_block_ops_gpu.py", "-m", "gpu", "-q",
                             "--benchmark-min-rounds=3", "--benchmark-max-time=0.05", "--benchmark-warmup=off",
                             f"--benchmark-json={res}/gpu_block_ops.json"], {}),
        ("bench_switchable_bn", [python, "-m", "pytest", "benchmarks/bench_switchable_bn.py", "-q",
                                 f"--benchmark-json={res}/gpu_switchable_bn.json"],
         {"SK_BENCH_DEVICE": "cuda", "SK_BENCH_ROUNDS": "5"}),
        ("bench_train_step", [python, "benchmarks/bench_train_step.py", "--device", "cuda", "--rounds", "3",
                              "--no-memory", "--json", f"{res}/gpu_train_step.json"], {}),
        ("pytest_triton", [python, "-m", "pytest", "python_tests", "-m", "triton", "-q", "-p", "no:cacheprovider"],
         {"TRITON_INTERPRET": "0"}),
    ]
    return out


def run_step(name: str, argv: list[str], env_extra: dict, budget: float) -> dict:
    """Runs one step under ``timeout`` (SIGTERM, then SIGKILL 10 s later); never raises."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "benchmarks"),
                                                                    os.environ.get("PYTHONPATH")) if p), **env_extra)
    if env.get("TRITON_INTERPRET") == "0":
        del env["TRITON_INTERPRET"]  # the Triton tests then run on CUDA tensors
    cmd = ["timeout", "-k", "10", str(max(1, int(budget))), *argv]
    print(f"== {name} (at most {int(budget)} s): {' '.join(argv)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t0
    sys.stdout.write(proc.stdout[-6000:])
    rc = proc.returncode
    # pytest exit 5: nothing selected (e.g. no Triton installed) is not a failure
    ok = rc == 0 or (rc == 5 and "pytest" in argv)
    print(f"== {name}: {'ok' if ok else 'FAILED'} (exit {rc}{', timed out' if rc in (124, 137) else ''}, "
          f"{seconds:.0f} s)", flush=True)
    return {"name": name, "cmd": argv, "env": env_extra, "rc": rc, "ok": ok, "timed_out": rc in (124, 137),
            "seconds": round(seconds, 1), "budget_s": int(budget), "output_tail": proc.stdout[-3000:]}


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="build with CUDA, run the GPU tests and benchmarks (small rounds)")
    ap.add_argument("--no-build", action="store_true", help="use the extension as it is built")
    ap.add_argument("--deadline", type=float, default=470.0, help="seconds for all steps together")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    ap.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST (default: the present GPU's)")
    args = ap.parse_args(argv)
    if not args.deadline > 0:
        ap.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    ok, why = gpu_present()
    if not ok and not args.dry_run:
        print(f"gpu-check: skipped, {why}. Nothing was built or run; on a machine with a CUDA GPU this "
              "builds the CUDA kernels, runs `pytest -m gpu` and the GPU benchmarks.", flush=True)
        return 0
    import torch

    if args.arch is not None:
        arch = args.arch
    elif ok:
        arch = arch_list(torch.cuda.get_device_capability())
    else:
        arch = "9.0"  # dry run without a device: an example
    plan = steps(sys.executable, arch, build=not args.no_build)
    if args.dry_run:
        for name, cmd, env in plan:
            envs = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"{name:20s} {CAPS[name]:4d} s  {envs + ' ' if envs else ''}{' '.join(cmd)}")
        return 0
    start = time.monotonic()
    records = []
    for name, cmd, env in plan:
        left = args.deadline - (time.monotonic() - start)
        if left < 5:
            records.append({"name": name, "cmd": cmd, "env": env, "ok": False, "skipped": "deadline reached"})
            print(f"== {name}: skipped, the {args.deadline:.0f} s deadline is reached", flush=True)
            continue
        records.append(run_step(name, cmd, env, min(CAPS[name], left)))
    summary = {
        "device": torch.cuda.get_device_name(0), "capability": arch, "torch": torch.__version__,
        "cuda": torch.version.cuda, "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.monotonic() - start, 1), "steps": records,
    }
    write_json(os.path.join(ROOT, RESULTS, "gpu_check.json"), summary)
    failed = [r["name"] for r in records if not r["ok"]]
    print(f"gpu-check: {len(records) - len(failed)}/{len(records)} steps ok in {summary['seconds']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; summary in {RESULTS}/gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
