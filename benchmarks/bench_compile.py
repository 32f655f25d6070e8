"""torch.compile vs eager for the training step (issue 19, item 4), small-model regime.

The setting of ``bench_small_model.py`` (MobileNet-v1 width_mult 0.5, max_width 1.2, 16x16,
batch 32, one thread; the ParaDiS step [1.2], [1.0], [0.5,0.5], [4x0.25] with its losses),
four providers on the same inputs, weights and losses, timed interleaved (wall and CPU time):

  * slimkern_packed:           ``packed_step`` eager (one packed pass + one backward);
  * slimkern_packed_compiled:  ``torch.compile(slimkern.train.packed_loss, fullgraph=True)``
                               (Inductor), then ``total.backward()`` (the compiled backward);
  * plain_torch:               the slimmable_networks loop of ``_plain_slimmable.py``, forward +
                               backward per switch;
  * plain_torch_compiled:      that loop's forwards and losses compiled as one graph
                               (``fullgraph=True``) and one backward of their sum -- the gradient
                               of the per-switch loop, since every cross-switch target is detached.

Compile time (first call, and the second call, which recompiles once: see
python_tests/test_compile.py) is recorded per provider in ``extra_info``.

    PYTHONPATH=. nice -n 10 python benchmarks/bench_compile.py --json benchmarks/results/compile.json
    python benchmarks/summarize.py benchmarks/results/compile.json --base plain_torch
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _plain_slimmable as P  # noqa: E402
import bench_train_step as b  # noqa: E402
from _process import interleaved, interleaved_entry, write_results  # noqa: E402

BATCH, THREADS, RES, MODEL, WIDTH_MULT = 32, 1, 16, "mobilenet_v1", 0.5
PROVIDERS = ("slimkern_packed", "slimkern_packed_compiled", "plain_torch", "plain_torch_compiled")


def _configure():
    b.BATCH, b.THREADS, b.RES, b.MODELS = BATCH, THREADS, RES, {MODEL: WIDTH_MULT}


def _compiled_slimkern(step: str):
    import slimkern as sk
    from slimkern.models import build
    from slimkern.train import packed_loss

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    net = build(MODEL, max_width=b.MAX_WIDTH, width_mult=WIDTH_MULT).train()
    x, y = _data()
    sws = b.step_switches(step)
    loss_fn = P.paradis_loss(y, beta=1.0) if step == "paradis" else P.sandwich_loss(y)
    sk.nn.register_switches(net, sws)
    switches = [sk.Switch.parse(s) for s in sws]
    compiled = torch.compile(packed_loss, fullgraph=True)
    features = step == "paradis"

    def run():
        for p in net.parameters():
            p.grad = None
        total, losses = compiled(net, x, switches, loss_fn, features=features)
        total.backward()
        return losses
    return run, sws


def _compiled_plain(step: str):
    import slimkern as sk
    from slimkern.models import build

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    net = build(MODEL, max_width=b.MAX_WIDTH, width_mult=WIDTH_MULT).train()
    sws = b.step_switches(step)
    plain = P.build_plain(MODEL, max_width=b.MAX_WIDTH, width_mult=WIDTH_MULT, num_switches=len(sws)).train()
    P.load_from_slim(plain, net)
    x, y = _data()
    loss_fn = P.paradis_loss(y, beta=1.0) if step == "paradis" else P.sandwich_loss(y)
    branches = [sk.Switch.parse(s).branches for s in sws]

    def forward_losses(x):
        prev, total, losses = [], None, []
        for i, br in enumerate(branches):
            z, f = P.forward_switch(plain, x, br, i)
            loss = loss_fn(i, z, f, prev)
            prev.append((z.detach(), f.detach()))
            losses.append(loss.detach())
            total = loss if total is None else total + loss
        return total, losses

    compiled = torch.compile(forward_losses, fullgraph=True)

    def run():
        for p in plain.parameters():
            p.grad = None
        total, losses = compiled(x)
        total.backward()
        return losses
    return run, sws


def _data():
    # the generator draws of bench_train_step.make_case: the same x, y for every provider
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, RES, RES, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return x, y


def make_case(step: str, provider: str):
    if provider == "slimkern_packed_compiled":
        return _compiled_slimkern(step)
    if provider == "plain_torch_compiled":
        return _compiled_plain(step)
    return b.make_case(MODEL, step, provider)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compiled vs eager training steps, timed interleaved")
    ap.add_argument("--json", default=None, help="output file (pytest-benchmark layout)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", nargs="+", default=["paradis"], choices=["paradis", "sandwich"])
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    warnings.simplefilter("ignore")
    _configure()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    benches = []
    for step in args.steps:
        cases, compile_s, losses = {}, {}, {}
        for p in PROVIDERS:
            cases[p] = make_case(step, p)
            times = []
            for _ in range(2):  # compiled: the compile, then the one recompile; eager: warm-up
                t0 = time.perf_counter()
                losses[p] = torch.stack(cases[p][0]())
                times.append(time.perf_counter() - t0)
            compile_s[p] = times
            print(f"{step} {p}: first calls {', '.join(f'{t:.1f}' for t in times)} s", flush=True)
        # the compiled steps compute what their eager twins do (no optimiser step: same losses)
        for p in ("slimkern_packed", "plain_torch"):
            torch.testing.assert_close(losses[p + "_compiled"], losses[p], rtol=1e-4, atol=1e-5)
        cpu, wall = interleaved({p: cases[p][0] for p in PROVIDERS}, args.rounds)
        group = f"compile/{MODEL}/{step}"
        for p in PROVIDERS:
            benches.append(interleaved_entry(
                group, f"test_compile[{MODEL}-{step}-{p}]", dict(model=MODEL, step=step, provider=p),
                dict(provider=p, model=MODEL, step=step, switches=cases[p][1], batch=BATCH, res=RES,
                     threads=torch.get_num_threads(), width_mult=WIDTH_MULT, max_width=b.MAX_WIDTH, malloc=b.MALLOC,
                     first_calls_s=compile_s[p], cpu_data=cpu[p]), wall[p], cpu[p]))
        mw = {p: statistics.median(wall[p]) for p in PROVIDERS}
        mc = {p: statistics.median(cpu[p]) for p in PROVIDERS}
        for p in PROVIDERS:
            print(f"{step:9s} {p:25s} wall {mw[p] * 1e3:8.1f} ms ({mw['plain_torch'] / mw[p]:.2f}x plain)"
                  f"   cpu {mc[p] * 1e3:8.1f} ms ({mc['plain_torch'] / mc[p]:.2f}x plain)", flush=True)
    if args.json:
        write_results(args.json, benches, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
