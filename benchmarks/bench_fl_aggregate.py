"""Sliced federated aggregation: vectorised over clients vs a per-parameter-per-client loop.

100 clients on a CIFAR ResNet-20 (slimkern.models), in three tiers: 30 x ``[1.0]``,
40 x ``[0.5]``, 30 x ``[0.5, 0.5]`` (two devices), aggregated with the ParaDiS rule
(element-wise weighted average over the channel windows each client trained).

Providers (same updates, same result, checked):
  * ``vectorised``        -- ``Aggregator.aggregate`` on flat updates (the simulation's wire
                             format): one fused multiply-add per client over all its
                             elements, one ``index_add_`` per distinct switch;
  * ``vectorised_sliced`` -- the same from dicts of sliced tensors (includes packing them);
  * ``loop``              -- ``aggregate_loop``: for each client, parameter and window,
                             ``acc[w] += n * t; cnt[w] += n``.

Run:  PYTHONPATH=. python benchmarks/bench_fl_aggregate.py   (writes results/fl_aggregate.json)
or:   pytest benchmarks/bench_fl_aggregate.py                (pytest-benchmark)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

from slimkern.fl.aggregate import Aggregator, ClientUpdate, aggregate_loop

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fl_aggregate.json")


def setup(num_clients: int = 100, seed: int = 0):
    from slimkern import Switch
    from slimkern.models import resnet20
    from slimkern.nn import parameter_ranges

    torch.manual_seed(seed)
    net = resnet20(num_classes=10)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    cache: dict = {}

    def windows(sw):
        if sw not in cache:
            cache[sw] = parameter_ranges(net, sw)
        return cache[sw]

    agg = Aggregator.for_params(params, windows)
    tiers = [Switch([1.0])] * 30 + [Switch([0.5])] * 40 + [Switch([0.5, 0.5])] * 30
    tiers = [tiers[i * len(tiers) // num_clients] for i in range(num_clients)]
    g = torch.Generator().manual_seed(seed)
    flat_updates, sliced_updates = [], []
    for k, sw in enumerate(tiers):
        n = float(torch.randint(20, 200, (1,), generator=g))
        local = {name: p + 0.01 * torch.randn(p.shape, generator=g) for name, p in params.items()}
        flat_updates.append(ClientUpdate(k, sw, agg.extract(local, sw), n))
        sliced_updates.append(ClientUpdate(k, sw, agg.extract_sliced(local, sw), n))
    for sw in set(tiers):
        agg.layout(sw)  # layouts are computed once per switch for a whole run, not per round
    return params, agg, windows, flat_updates, sliced_updates


def run(repeats: int = 7, num_clients: int = 100, threads: int = 1) -> dict:
    # one thread: on a shared 2-core box, OpenMP barriers of 100 short parallel regions
    # stall whenever a sibling thread is descheduled (measured: 5 s with 2 threads vs 40 ms); the loop
    # baseline is single-threaded anyway (its tensors are below the parallel grain size)
    torch.set_num_threads(threads)
    params, agg, windows, flat_u, sliced_u = setup(num_clients)
    ref = aggregate_loop(params, sliced_u, windows)
    vec, _ = agg.aggregate(params, flat_u)
    vec2, _ = agg.aggregate(params, sliced_u)
    for n in params:
        torch.testing.assert_close(vec[n], ref[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vec2[n], ref[n], rtol=1e-5, atol=1e-6)
    # interleaved, so that a burst of load from other processes hits every provider alike
    fns = {"vectorised": lambda: agg.aggregate(params, flat_u),
           "vectorised_sliced": lambda: agg.aggregate(params, sliced_u),
           "loop": lambda: aggregate_loop(params, sliced_u, windows)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    (t_vec, all_vec), (t_vs, all_vs), (t_loop, all_loop) = (
        (statistics.median(times[k]), times[k]) for k in fns)
    return {
        "benchmark": "fl_aggregate",
        "model": "resnet20 (CIFAR, slimkern.models)",
        "num_params": sum(p.numel() for p in params.values()),
        "num_tensors": len(params),
        "clients": num_clients,
        "tiers": {"[1.0]x": 30, "[0.5]x": 40, "[0.5, 0.5]x": 30},
        "rule": "paradis (element-wise weighted average over trained windows)",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "repeats": repeats,
        "median_s": {"vectorised": t_vec, "vectorised_sliced": t_vs, "loop": t_loop},
        "all_s": {"vectorised": all_vec, "vectorised_sliced": all_vs, "loop": all_loop},
        "speedup_vs_loop": {"vectorised": t_loop / t_vec, "vectorised_sliced": t_loop / t_vs},
        "speedup_vs_loop_per_repeat": {
            "vectorised": statistics.median(l / v for l, v in zip(all_loop, all_vec)),
            "vectorised_sliced": statistics.median(l / v for l, v in zip(all_loop, all_vs))},
    }


def main(argv=None):
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args(argv)
    res = run()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, RESULTS)
    m = res["median_s"]
    print(f"{res['clients']} clients, {res['num_params']} params: vectorised {m['vectorised'] * 1e3:.1f} ms, "
          f"vectorised (sliced dicts) {m['vectorised_sliced'] * 1e3:.1f} ms, loop {m['loop'] * 1e3:.1f} ms; "
          f"speed-up {res['speedup_vs_loop']['vectorised']:.1f}x / {res['speedup_vs_loop']['vectorised_sliced']:.1f}x")
    return 0


# -- pytest-benchmark -------------------------------------------------------------------------
_CACHE: dict = {}


def _data():
    if "d" not in _CACHE:
        _CACHE["d"] = setup()
    return _CACHE["d"]


def test_bench_fl_aggregate_vectorised(benchmark):
    params, agg, _, flat_u, _ = _data()
    benchmark(lambda: agg.aggregate(params, flat_u))


def test_bench_fl_aggregate_loop(benchmark):
    params, _, windows, _, sliced_u = _data()
    benchmark.pedantic(lambda: aggregate_loop(params, sliced_u, windows), rounds=3, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
