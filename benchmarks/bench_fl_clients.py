"""Federated simulation throughput: clients trained one by one vs client-batched (issue 19).

One round of the federated demo's setting (``slimkern demo`` / ``slimkern fl`` defaults,
``slimkern.fl.demo.DEMO_FL``): ``SmallCNN`` channels 32-64-12 on 8x8 digits, tiers
``[1.0]`` 30 % / ``[0.5]`` 40 % / ``[0.5, 0.5]`` 30 %, Dirichlet(0.5) label skew, the
``paradis`` rule (nested: a full device also trains ``[0.5, 0.5]`` and ``[0.5]`` in the same
packed pass, distilled in place), 5 local epochs of SGD (lr 0.2, momentum 0.9, weight decay
5e-4) at batch 16 with the demo's RandomAffine augmentation. 20 and 100 clients, every client
picked. Providers, on the same round's tasks:

  * ``sequential`` -- ``slimkern.fl.client.train_task`` per client (what ``simulate`` does by
                      default; the packed C++ ops);
  * ``batched``    -- ``slimkern.fl.batched.ClientBatcher.train`` (``simulate(...,
                      client_batching=True)``, ``slimkern fl --batch-clients``).

Timing is interleaved (a burst of load from other processes hits both alike), wall clock and
process CPU time, medians over the repeats and the median of the per-repeat ratios. The JSON
also records how far the batched replies are from the sequential ones after the round (max
over clients of the max element difference) and, as the yardstick for that number, how far
the sequential replies move when the received weights are perturbed by a relative 1e-7 (the
size of a float32 rounding): local training at the demo's learning rate amplifies rounding
differences, so some clients end far apart whatever the order of the sums.

Run:  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_fl_clients.py   (writes results/fl_clients.json)
or:   pytest benchmarks/bench_fl_clients.py                                            (pytest-benchmark)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _process import cpu_name  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fl_clients.json")


def setup(num_clients: int, strategy: str = "paradis", seed: int = 0):
    """The demo's round 0 at ``num_clients`` clients: (server, plan, X, Y, augment, net)."""
    from slimkern.fl.augment import RandomAffine
    from slimkern.fl.demo import DEMO_FL, load_digits_split, rule_from_cfg
    from slimkern.fl.models import small_cnn
    from slimkern.fl.server import Server
    from slimkern.fl.simulate import make_clients, parse_tiers

    cfg = dict(DEMO_FL)
    train, calib, test = load_digits_split(seed, cfg["calib_fraction"])
    clients = make_clients(train[1].numpy(), parse_tiers(cfg["tiers"]), num_clients, cfg["partition"],
                           alpha=cfg["alpha"], classes_per_client=cfg["classes_per_client"], seed=seed)
    augment = RandomAffine(cfg["aug_rotate"], cfg["aug_translate"], cfg["aug_scale"], fill=float(train[0].min()))
    net = small_cnn(10, 1, tuple(cfg["channels"]), seed=seed)
    server = Server(net, rule_from_cfg(strategy, cfg), clients, train_labels=train[1],
                    input_shape=train[0].shape[1:], test_set=test, calib_set=calib, seed=seed,
                    rounds=cfg["rounds"], lr=cfg["lr"], lr_schedule=cfg["lr_schedule"],
                    local_epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], log=lambda m: None)
    plan = server.begin_round(0)
    return server, plan, train[0], train[1], augment, net


def providers(server, plan, X, Y, augment, net):
    from slimkern.fl.batched import ClientBatcher
    from slimkern.fl.client import client_aggregator, train_task

    work = copy.deepcopy(net)
    agg = client_aggregator(work)
    batcher = ClientBatcher(work, server.rule, agg)
    indices = {cid: server.by_id[cid].indices for cid in plan.tasks}
    tasks = list(plan.tasks.values())

    def sequential():
        return {cid: train_task(work, t, X, Y, indices[cid], augment, agg) for cid, t in plan.tasks.items()}

    def batched():
        replies, rest = batcher.train(tasks, X, Y, indices, augment)
        for t in rest:
            replies[t.client] = train_task(work, t, X, Y, indices[t.client], augment, agg)
        return replies

    return {"sequential": sequential, "batched": batched}


def deviation(server, plan, X, Y, augment, net, fns) -> dict:
    """Batched vs sequential replies, and the sequential replies' own sensitivity to a
    relative 1e-7 perturbation of the received weights."""
    from slimkern.fl.client import train_task
    seq, bat = fns["sequential"](), fns["batched"]()
    g = torch.Generator().manual_seed(1)
    pert = {}
    for cid, t in plan.tasks.items():
        v = t.values * (1 + 1e-7 * torch.randn(t.values.shape, generator=g))
        pert[cid] = train_task(copy.deepcopy(net), dataclasses.replace(t, values=v), X, Y,
                               server.by_id[cid].indices, augment)
    d_b = {c: float((bat[c].values - seq[c].values).abs().max()) for c in seq}
    d_p = {c: float((pert[c].values - seq[c].values).abs().max()) for c in seq}
    return {"batched_vs_sequential_max": max(d_b.values()),
            "batched_vs_sequential_median": statistics.median(d_b.values()),
            "sequential_perturbed_1e-7_max": max(d_p.values()),
            "sequential_perturbed_1e-7_median": statistics.median(d_p.values()),
            "clients_within_1e-5": sum(v <= 1e-5 for v in d_b.values())}


def run(clients=(20, 100), repeats: int = 5, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    out = {"benchmark": "fl_clients", "setting": "slimkern demo (DEMO_FL) round 0, paradis, every client picked",
           "machine": {"cpu": cpu_name(), "platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cores": os.cpu_count()},
           "repeats": repeats, "cases": {}}
    try:
        from slimkern import _library
        out["machine"]["slimkern_cpu_capability"] = _library.cpu_capability()
    except Exception:  # noqa: BLE001 - informative only
        pass
    for n in clients:
        data = setup(n)
        fns = providers(*data)
        dev = deviation(*data, fns)
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
        ratio = lambda d: statistics.median(s / b for s, b in zip(d["sequential"], d["batched"]))  # noqa: E731
        steps = sum(1 for _ in plan_steps(data))
        out["cases"][str(n)] = {
            "clients": n, "local_steps": steps,
            "median_wall_s": med(wall), "median_cpu_s": med(cpu), "all_wall_s": wall, "all_cpu_s": cpu,
            "speedup_wall": ratio(wall), "speedup_cpu": ratio(cpu),
            "rounds_per_s_wall": {k: 1 / v for k, v in med(wall).items()},
            "deviation": dev}
        c = out["cases"][str(n)]
        print(f"{n} clients ({steps} local steps): sequential {c['median_cpu_s']['sequential']:.2f} s CPU / "
              f"{c['median_wall_s']['sequential']:.2f} s wall, batched {c['median_cpu_s']['batched']:.2f} s CPU / "
              f"{c['median_wall_s']['batched']:.2f} s wall: {c['speedup_cpu']:.2f}x CPU, {c['speedup_wall']:.2f}x wall; "
              f"max |batched - sequential| {dev['batched_vs_sequential_max']:.2g} "
              f"(sequential under 1e-7 noise: {dev['sequential_perturbed_1e-7_max']:.2g})", flush=True)
    return out


def plan_steps(data):
    """Every client's local steps of the round (for the record)."""
    import random

    from slimkern.fl.client import local_batches
    server, plan, X, Y, _, _ = data
    for cid, t in plan.tasks.items():
        yield from local_batches(X, Y, server.by_id[cid].indices, t.key, t.rule, t.local_epochs, t.batch_size,
                                 torch.Generator().manual_seed(0), random.Random(0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=RESULTS)
    args = ap.parse_args(argv)
    res = run(tuple(args.clients), args.repeats)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, args.json)
    return 0


# -- pytest-benchmark -------------------------------------------------------------------------
_CACHE: dict = {}


def _fns(n):
    if n not in _CACHE:
        torch.set_num_threads(1)
        _CACHE[n] = providers(*setup(n))
    return _CACHE[n]


def _bench(benchmark, n, provider):
    import pytest
    pytest.importorskip("pytest_benchmark")
    fn = _fns(n)[provider]
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def test_bench_fl_clients_sequential_20(benchmark):
    _bench(benchmark, 20, "sequential")


def test_bench_fl_clients_batched_20(benchmark):
    _bench(benchmark, 20, "batched")


def test_bench_fl_clients_sequential_100(benchmark):
    _bench(benchmark, 100, "sequential")


def test_bench_fl_clients_batched_100(benchmark):
    _bench(benchmark, 100, "batched")


if __name__ == "__main__":
    sys.exit(main())
