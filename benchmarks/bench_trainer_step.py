"""The recipes' training step (``ParaDiSTrainer.train_step``: forward, losses, one backward, SGD)
with its forward packed vs one pass per switch (issue 19; ``slimkern.train.run_switches``).

``run_switches(pack="auto")`` packs where ``slimkern.train.packing.packing_pays`` says packing
pays and runs one pass per switch elsewhere; this benchmark times both schedules on the same
trainer, batch 64, 32x32, two threads, switches [1.2], [1.0], [0.5,0.5], [4x0.25]:

  * packed:      ``ParaDiSTrainer(..., pack=True)``, one ``forward_switches`` over all switches;
  * per_switch:  ``ParaDiSTrainer(..., pack=False)``, one ``forward_switches`` per switch.

    PYTHONPATH=. python benchmarks/bench_trainer_step.py --json benchmarks/results/trainer_step.json
    PYTHONPATH=. python -m pytest benchmarks/bench_trainer_step.py -q
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _process import interleaved, interleaved_entry, setup_allocator, write_results  # noqa: E402

MALLOC = setup_allocator()
BATCH, THREADS, MAX_WIDTH, RES = 64, 2, 1.2, 32
MODELS = ("resnet20", "mobilenet_v1")
PROVIDERS = ("packed", "per_switch")
SWITCHES = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
ROUNDS = int(os.environ.get("SK_BENCH_ROUNDS", "9"))


def make_case(model: str, provider: str):
    """``step()``: one ``train_step`` of a ParaDiS trainer whose forward uses ``provider``'s schedule."""
    from slimkern.models import build
    from slimkern.train import ParaDiSTrainer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    net = build(model, max_width=MAX_WIDTH)
    tr = ParaDiSTrainer(net, SWITCHES, progress=False, lr=0.01, pack=provider == "packed")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, RES, RES, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return lambda: tr.train_step(x, y)


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("model", MODELS)
    def test_trainer_step(benchmark, model, provider):
        step = make_case(model, provider)
        benchmark.group = f"trainer_step/{model}"
        benchmark.extra_info.update(provider=provider, model=model, batch=BATCH, threads=THREADS, malloc=MALLOC)
        step()
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def main(argv=None) -> int:
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description="trainer step, packed vs one pass per switch, timed interleaved")
    ap.add_argument("--json", default=None, help="output file (pytest-benchmark layout)")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    from slimkern.train.packing import packing_pays
    from slimkern.models import build

    benches = []
    for model in models:
        steps = {p: make_case(model, p) for p in PROVIDERS}
        for step in steps.values():
            step()
        cpu, wall = interleaved(steps, args.rounds)
        auto = "packed" if packing_pays(build(model, max_width=MAX_WIDTH)) else "per_switch"
        for p in PROVIDERS:
            benches.append(interleaved_entry(f"trainer_step/{model}", f"test_trainer_step[{model}-{p}]",
                                             dict(model=model, provider=p),
                                             dict(provider=p, model=model, batch=BATCH, threads=THREADS, malloc=MALLOC,
                                                  auto_picks=auto), wall[p], cpu[p]))
        mc = {p: statistics.median(cpu[p]) for p in PROVIDERS}
        print(f"{model:13s} cpu packed {mc['packed'] * 1e3:7.1f} ms  per_switch {mc['per_switch'] * 1e3:7.1f} ms  "
              f"per_switch/packed speed {mc['packed'] / mc['per_switch']:.2f}x  (auto: {auto})", flush=True)
    if args.json:
        write_results(args.json, benches, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
