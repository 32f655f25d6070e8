"""Training-step benchmark (issue 4): ParaDiS Algorithm 1 and the sandwich rule, CPU, float32,
batch 64, 2 threads, on MobileNet-v1 (32x32) and a CIFAR ResNet-20, built with max_width 1.2.

Steps (the same inputs, weights and losses for every provider):
  * paradis:  switches [1.2], [1.0], [0.5,0.5], [4x0.25]; CE for the wide [1.2], KD from it for
              the others, beta * MSE of the zero-padded features vs [1.0]'s for [0.5,0.5], [4x0.25];
  * sandwich: [1.0], [0.25] and two random widths (seeded: every provider sees the same ones);
              CE for [1.0], KD from it for the others.
Providers:
  * slimkern_packed:  one ``forward_switches`` over all switches + one backward;
  * slimkern_groups:  ``packed_step(group_size=2)``, the memory mode;
  * slimkern_single:  one switch per packed pass, backward each (``group_size=1``);
  the three with ``pack="auto"`` (``--pack true`` packs every group as asked): on a net of dense
  3x3 convolutions (ResNet-20) ``packed_step`` then runs every switch on its own pass, so the three
  run the same schedule there (``slimkern.train.packing``);
  * plain_torch:      the slimmable_networks way (benchmarks/_plain_slimmable.py): width_mult
                      attribute, sliced weights, per-width BN ModuleList, forward+backward per
                      switch (one forward per ParaDiS branch).
Peak memory: each provider runs 2 steps in a fresh subprocess; ``extra_info`` records the
process RSS high-water mark (``peak_rss_mb``) and its rise during the steps over the RSS after
setup (``step_peak_mb``: VmHWM reset via /proc/self/clear_refs, so it is the step's own peak).

    PYTHONPATH=. python -m pytest benchmarks/bench_train_step.py -q \\
        --benchmark-json=benchmarks/results/train_step.json
    PYTHONPATH=. python benchmarks/bench_train_step.py --json benchmarks/results/train_step.json
                                                          # interleaved (the ratios to quote)
    python benchmarks/summarize.py benchmarks/results/train_step.json --base plain_torch
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain_slimmable as P  # noqa: E402
from _process import interleaved, interleaved_entry, setup_allocator, write_results  # noqa: E402

MALLOC = setup_allocator()

BATCH, THREADS, MAX_WIDTH, RES = 64, 2, 1.2, 32  # RES: input height and width
DEVICE = "cpu"  # --device cuda: the same steps on a GPU (benchmarks/gpu_check.py)
MODELS = {"mobilenet_v1": 1.0, "resnet20": 1.0}  # width_mult: a plain step well under 2 s here
PROVIDERS = ("slimkern_packed", "slimkern_groups", "slimkern_single", "plain_torch")
GROUP_SIZE = 2
ROUNDS = int(os.environ.get("SK_BENCH_ROUNDS", "5"))
PACK = "auto"  # packed_step(pack=...): --pack true times literal packing


def step_switches(step: str) -> list[str]:
    if step == "paradis":
        return ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
    g = torch.Generator().manual_seed(0)  # US-Nets' two random widths in [0.25, 1.0], on a 1/32 grid
    rand = [round((0.25 + 0.75 * float(torch.rand((), generator=g))) * 32) / 32 for _ in range(2)]
    return ["[1.0]x", "[0.25]x"] + [f"[{w}]x" for w in rand]


def make_case(model: str, step: str, provider: str):
    """(step_fn, switches): ``step_fn()`` runs one full training step's forward+backward."""
    import slimkern as sk
    from slimkern.models import build
    from slimkern.train import packed_step

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    net = build(model, max_width=MAX_WIDTH, width_mult=MODELS[model]).train().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, RES, RES, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    x, y = x.to(DEVICE), y.to(DEVICE)
    sws = step_switches(step)
    loss_fn = P.paradis_loss(y, beta=1.0) if step == "paradis" else P.sandwich_loss(y)
    features = step == "paradis"
    if provider == "plain_torch":
        plain = P.build_plain(model, max_width=MAX_WIDTH, width_mult=MODELS[model], num_switches=len(sws))
        plain = plain.train().to(DEVICE)
        P.load_from_slim(plain, net)
        branches = [sk.Switch.parse(s).branches for s in sws]

        def run():
            for p in plain.parameters():
                p.grad = None
            return P.train_step(plain, x, branches, loss_fn)
        return run, sws
    group = {"slimkern_packed": None, "slimkern_groups": GROUP_SIZE, "slimkern_single": 1}[provider]
    sk.nn.register_switches(net, sws)

    def run():
        for p in net.parameters():
            p.grad = None
        return packed_step(net, x, sws, loss_fn, group_size=group, features=features, pack=PACK)
    return run, sws


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(model: str, step: str, provider: str) -> dict:
    """Peak memory of ``provider`` in a fresh process (2 steps, after setup)."""
    code = ("import json, sys; sys.argv = ['x']; import bench_train_step as b; "
            f"b.PACK = {PACK!r}; print(json.dumps(b._memory_child({model!r}, {step!r}, {provider!r})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.path.dirname(os.path.abspath(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(model: str, step: str, provider: str) -> dict:
    import gc
    import warnings

    warnings.simplefilter("ignore")
    run, _ = make_case(model, step, provider)
    gc.collect()
    base = _rss_mb("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        run()
    hwm = _rss_mb("VmHWM")
    return {"peak_rss_mb": round(hwm, 1), "setup_rss_mb": round(base, 1),
            "step_peak_mb": round(hwm - base, 1) if reset else None}


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("step", ["paradis", "sandwich"])
    @pytest.mark.parametrize("model", list(MODELS))
    def test_train_step(benchmark, model, step, provider):
        import warnings

        warnings.simplefilter("ignore")
        mem = measure_memory(model, step, provider) if os.environ.get("SK_BENCH_MEMORY", "1") == "1" else {}
        run, sws = make_case(model, step, provider)
        benchmark.group = f"train_step/{model}/{step}"
        benchmark.extra_info.update(provider=provider, model=model, step=step, switches=sws, batch=BATCH, malloc=MALLOC,
                                    threads=torch.get_num_threads(), width_mult=MODELS[model],
                                    max_width=MAX_WIDTH, group_size=GROUP_SIZE if provider == "slimkern_groups"
                                    else None, **mem)
        run()
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def step_gmac(model: str, switches) -> float:
    """Multiply-adds of one training step, in GMAC: 3 x the forward MACs of the switches
    (forward, input gradient, weight gradient; `slimkern.profile` of the whole batch)."""
    from slimkern import profile
    from slimkern.models import build

    net = build(model, max_width=MAX_WIDTH, width_mult=MODELS[model])
    return 3 * sum(profile(net, sw, input_size=(BATCH, 3, RES, RES)).macs for sw in switches) / 1e9


def main(argv=None) -> int:
    """Interleaved runner: every round times each provider once, in rotating order (the
    ratios to quote: a sequential pytest-benchmark run lets a load swing between providers
    land in the ratio). Writes the pytest-benchmark JSON layout with ``--json``."""
    import argparse
    import statistics
    import warnings

    ap = argparse.ArgumentParser(description="training-step providers timed interleaved")
    ap.add_argument("--json", default=None, help="output file (pytest-benchmark layout)")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure each provider's peak memory in a fresh process")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (no memory measurement on cuda)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--pack", choices=("auto", "true"), default="auto",
                    help="packed_step's pack: auto (pack where it pays, the default) or true (pack every group)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device must be cpu or cuda (with a CUDA device present), got {args.device!r}")
    global DEVICE, PACK
    DEVICE = args.device
    PACK = True if args.pack == "true" else "auto"
    warnings.simplefilter("ignore")
    from slimkern import _library

    peak = _library.fma_peak(0.5) if DEVICE == "cpu" else None  # one thread's register-resident FMA rate
    if peak:
        print(f"FMA peak: {peak / 1e9:.1f} GMAC/s a thread ({THREADS} threads: {THREADS * peak / 1e9:.1f})")
    benches = []
    for model in models:
        for step in ("paradis", "sandwich"):
            mem = {p: measure_memory(model, step, p) if args.memory and DEVICE == "cpu" else {} for p in PROVIDERS}
            cases = {p: make_case(model, step, p) for p in PROVIDERS}
            for run, _ in cases.values():
                run()
            cpu, wall = interleaved({p: cases[p][0] for p in PROVIDERS}, args.rounds,
                                    sync=torch.cuda.synchronize if DEVICE != "cpu" else None)
            group = f"train_step/{model}/{step}"
            gmac = step_gmac(model, step_switches(step))
            for p in PROVIDERS:
                benches.append(interleaved_entry(
                    group, f"test_train_step[{model}-{step}-{p}]", dict(model=model, step=step, provider=p),
                    dict(provider=p, model=model, step=step, switches=cases[p][1], batch=BATCH,
                         threads=torch.get_num_threads(), width_mult=MODELS[model], max_width=MAX_WIDTH,
                         group_size=GROUP_SIZE if p == "slimkern_groups" else None, malloc=MALLOC, device=DEVICE,
                         pack=None if p == "plain_torch" else str(PACK),
                         step_gmac=round(gmac, 3), fma_peak_gmac_s_per_thread=peak and round(peak / 1e9, 1),
                         **mem[p]), wall[p], cpu[p]))
            mw = {p: statistics.median(wall[p]) for p in PROVIDERS}
            mc = {p: statistics.median(cpu[p]) for p in PROVIDERS}
            for p in PROVIDERS:
                # MAC rate per thread-second of CPU time, and its share of one thread's FMA peak
                rate = gmac / mc[p]
                share = f" = {100 * rate / (peak / 1e9):4.1f} % of peak" if peak else ""
                print(f"{model:13s} {step:9s} {p:16s} wall {mw[p] * 1e3:8.1f} ms ({mw['plain_torch'] / mw[p]:.2f}x)"
                      f"   cpu {mc[p] * 1e3:8.1f} ms ({mc['plain_torch'] / mc[p]:.2f}x)"
                      f"   {gmac:.2f} GMAC: {rate:5.1f} GMAC/s a thread{share}"
                      f"   step peak {mem[p].get('step_peak_mb')} MB", flush=True)
    if args.json:
        write_results(args.json, benches, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
