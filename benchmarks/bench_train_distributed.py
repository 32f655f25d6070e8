"""Data-parallel training throughput (issue 14, part 2): optimizer steps per second of one
ParaDiS step (switches [1.2], [1.0], [0.5,0.5], [4x0.25]; CE + KD from the wide teacher +
activation MSE) at a fixed *global* batch, for 1 and 2 processes on this machine.

Providers (the same model, data and global batch ``GLOBAL_BATCH``):
  * 1proc_1thread   one process, no torch.distributed, 1 thread (the fused C++ BN kernel);
  * 1proc_2threads  one process, 2 threads (what 2 cores give one process);
  * 2proc_syncbn    2 ranks x 1 thread, gloo on 127.0.0.1, GLOBAL_BATCH/2 each, synchronised BN
                    (the default: equals the 1-process step to 1e-5);
  * 2proc_localbn   2 ranks, per-rank BN statistics (no BN all-reduces; a different function).
Each provider runs in fresh processes: ``WARMUP`` steps, then ``STEPS`` timed steps between
barriers; steps/s = STEPS / wall seconds of rank 0 (also recorded: rank 0's CPU seconds per step
and the 1-minute load average before and after, since on a shared machine the wall time says
as much about the other tenants as about the code). Provider order rotates over ``--rounds``.

    nice -n 10 .venv/bin/python benchmarks/bench_train_distributed.py \\
        --json benchmarks/results/train_distributed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _process import setup_allocator, write_results  # noqa: E402

MODEL, WIDTH_MULT, MAX_WIDTH, IMAGE = "resnet20", 0.5, 1.2, 16
SWITCHES = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
GLOBAL_BATCH = 64
WARMUP, STEPS = 2, int(os.environ.get("SK_BENCH_STEPS", "10"))
PROVIDERS = {"1proc_1thread": (1, 1, True), "1proc_2threads": (1, 2, True), "2proc_syncbn": (2, 1, True),
             "2proc_localbn": (2, 1, False)}


def worker(out: str, threads: int, sync_bn: bool) -> int:
    """One rank (or the single process): time STEPS steps, rank 0 writes ``out``."""
    from torch.utils.data import TensorDataset

    from slimkern import models
    from slimkern.train import ParaDiSTrainer
    from slimkern.train import distributed as D
    from slimkern.train.optim import make_scheduler

    malloc = setup_allocator()
    torch.set_num_threads(threads)
    dp = D.init_from_env("gloo", sync_bn=sync_bn)
    try:
        world = dp.world_size if dp is not None else 1
        torch.manual_seed(0)
        net = models.build(MODEL, num_classes=10, in_channels=3, max_width=MAX_WIDTH, width_mult=WIDTH_MULT)
        g = torch.Generator().manual_seed(1)
        n = GLOBAL_BATCH * (WARMUP + STEPS)
        data = TensorDataset(torch.randn(n, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (n,), generator=g))
        t = ParaDiSTrainer(net, SWITCHES, beta=1.0, kd="wide", progress=False, distributed=dp)
        loader = t.make_loader(data, GLOBAL_BATCH // world)
        t.scheduler = make_scheduler(t.optimizer, t.schedule, len(loader), len(loader))
        if dp is not None:
            dp.sync_trainer(t)
        batches = list(loader)
        for x, y in batches[:WARMUP]:
            t.train_step(x, y)
        if dp is not None:
            dp.barrier()
        load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
        for x, y in batches[WARMUP:]:
            t.train_step(x, y)
        if dp is not None:
            dp.barrier()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if dp is None or dp.is_main:
            with open(out, "w") as f:
                json.dump({"steps": len(batches) - WARMUP, "wall_s": wall, "rank0_cpu_s": cpu, "world": world,
                           "malloc": malloc, "load_avg_1min": [load0, os.getloadavg()[0]]}, f)
        return 0
    finally:
        D.shutdown()


def run_provider(name: str) -> dict:
    from slimkern.train.distributed import launch

    nproc, threads, sync_bn = PROVIDERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--threads", str(threads)]
        cmd += [] if sync_bn else ["--local-bn"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if nproc == 1:
            rc = subprocess.run(cmd, env=env, timeout=600).returncode
        else:
            rc = launch(cmd, nproc, env=env, timeout_s=600)
        if rc != 0:
            raise RuntimeError(f"{name}: exited with {rc}")
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="output file (pytest-benchmark layout)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--local-bn", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads, not args.local_bn)
    names = list(PROVIDERS)
    rates: dict[str, list[float]] = {p: [] for p in names}
    runs: dict[str, list[dict]] = {p: [] for p in names}
    for r in range(args.rounds):
        for p in names[r % len(names):] + names[:r % len(names)]:
            res = run_provider(p)
            rates[p].append(res["steps"] / res["wall_s"])
            runs[p].append(res)
            print(f"round {r} {p:15s} {rates[p][-1]:.2f} steps/s  rank-0 cpu {res['rank0_cpu_s'] / res['steps']:.3f} "
                  f"s/step  load {res['load_avg_1min']}", flush=True)
    benches = []
    base = statistics.median(rates["1proc_1thread"])
    for p in names:
        nproc, threads, sync_bn = PROVIDERS[p]
        d = [1.0 / v for v in rates[p]]  # seconds per step, the pytest-benchmark statistic
        med = statistics.median(rates[p])
        print(f"{p:15s} {med:6.2f} steps/s  ({med / base:.2f}x 1proc_1thread)")
        benches.append(dict(
            group=f"train_distributed/{MODEL}/paradis", name=f"test_train_distributed[{p}]",
            params=dict(provider=p),
            extra_info=dict(provider=p, nproc=nproc, threads_per_proc=threads, sync_bn=sync_bn, model=MODEL,
                            width_mult=WIDTH_MULT, max_width=MAX_WIDTH, image=IMAGE, switches=SWITCHES,
                            global_batch=GLOBAL_BATCH, rank_batch=GLOBAL_BATCH // nproc, steps=STEPS,
                            steps_per_s=rates[p], steps_per_s_median=med, backend="gloo" if nproc > 1 else None,
                            cpus=os.cpu_count(), runs=runs[p],
                            rank0_cpu_s_per_step=[x["rank0_cpu_s"] / x["steps"] for x in runs[p]]),
            options=dict(timer="time.perf_counter"),
            stats=dict(min=min(d), max=max(d), mean=statistics.fmean(d), median=statistics.median(d),
                       rounds=len(d), data=d)))
    if args.json:
        write_results(args.json, benches, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
