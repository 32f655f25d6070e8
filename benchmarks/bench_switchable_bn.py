"""switchable_batch_norm + relu, forward+backward, vs per-block F.batch_norm + relu + cat.

MobileNet-v1 (CIFAR) and CIFAR-ResNet BN shapes at batch 64, float32, CPU. Block tables:
one 1.0x switch, ParaDiS [0.5, 0.5] (two blocks sharing one stat row), and the sandwich
[1.0], [0.5], [0.25] packed into one call (three rows).

    PYTHONPATH=. python -m pytest benchmarks/bench_switchable_bn.py --benchmark-json=benchmarks/results/switchable_bn.json
    python benchmarks/summarize.py benchmarks/results/switchable_bn.json --bn

SK_BENCH_THREADS=1 runs both providers on one thread (steadier on a shared, loaded machine).
SK_BENCH_ROUNDS sets the timed rounds (15). SK_BENCH_DEVICE=cuda runs the same cases on a GPU
with a third provider, slimkern_triton (the default backend there); slimkern_cpp is then the
C++ CUDA kernel (benchmarks/gpu_check.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from slimkern.ops.switchable_batch_norm import switchable_batch_norm
from _process import setup_allocator

MALLOC = setup_allocator()

SHAPES = {  # name: (C, H)
    "mbv1_c64_32": (64, 32),
    "mbv1_c128_16": (128, 16),
    "mbv1_c256_8": (256, 8),
    "mbv1_c512_4": (512, 4),
    "resnet_c16_32": (16, 32),
    "resnet_c64_8": (64, 8),
}
TABLES = {
    "1.0": lambda c: ([(0, c)], [0]),
    "paradis_0.5_0.5": lambda c: ([(0, c // 2), (c // 2, c)], [1, 1]),
    "sandwich_1.0_0.5_0.25": lambda c: ([(0, c), (0, c // 2), (0, c // 4)], [0, 2, 3]),
}
BATCH = 64
DEVICE = os.environ.get("SK_BENCH_DEVICE", "cpu")
if os.environ.get("SK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SK_BENCH_THREADS"]))


def per_block_reference(x, w, b, rm, rv, blocks, rows):
    outs, off = [], 0
    for (a, z), r in zip(blocks, rows):
        xg = x[:, off:off + z - a]
        off += z - a
        outs.append(F.relu(F.batch_norm(xg, rm[r, a:z], rv[r, a:z], w[a:z], b[a:z], True, 0.1, 1e-5)))
    return torch.cat(outs, 1)


def make_step(provider, shape, table):
    c, h = SHAPES[shape]
    blocks, rows = TABLES[table](c)
    cp = sum(z - a for a, z in blocks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cp, h, h, generator=g).requires_grad_(True)
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=g).requires_grad_(True)
    rm, rv = torch.zeros(4, c), torch.ones(4, c)
    gy = torch.randn(BATCH, cp, h, h, generator=g)
    if DEVICE != "cpu":
        x, w, b = (t.detach().to(DEVICE).requires_grad_(True) for t in (x, w, b))
        rm, rv, gy = rm.to(DEVICE), rv.to(DEVICE), gy.to(DEVICE)

    if provider.startswith("slimkern_"):
        backend = provider[len("slimkern_"):]

        def fwd():
            return switchable_batch_norm(x, w, b, rm, rv, blocks, rows, True, 0.1, 1e-5, "relu", backend=backend)
    else:
        def fwd():
            return per_block_reference(x, w, b, rm, rv, blocks, rows)

    def step():
        x.grad = w.grad = b.grad = None
        fwd().backward(gy)
        if DEVICE != "cpu":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("provider", ["slimkern_cpp", "slimkern_triton", "torch_per_block"])
@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bn_relu_fwd_bwd(benchmark, provider, shape, table):
    if provider == "slimkern_triton" and DEVICE == "cpu":
        pytest.skip("the Triton provider runs on SK_BENCH_DEVICE=cuda")
    benchmark.group = f"bn_relu_fwd_bwd/{shape}/{table}"
    benchmark.extra_info.update(provider=provider, shape=shape, table=table, batch=BATCH, malloc=MALLOC,
                                threads=torch.get_num_threads(), device=DEVICE)
    step = make_step(provider, shape, table)
    step()
    benchmark.pedantic(step, rounds=int(os.environ.get("SK_BENCH_ROUNDS", "15")), iterations=1, warmup_rounds=2)


def main(argv=None):
    """A quick side-by-side without pytest-benchmark: medians of wall time, one line a case."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description="switchable BN + ReLU vs per-block torch, a quick side-by-side "
                                             "(the pytest-benchmark run is in the module docstring)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per case (median)")
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--tables", nargs="*", choices=list(TABLES), default=list(TABLES))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    for shape in args.shapes:
        for table in args.tables:
            med = {}
            for provider in ("slimkern_cpp", "torch_per_block"):
                step = make_step(provider, shape, table)
                step()
                ts = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    step()
                    ts.append(time.perf_counter() - t0)
                med[provider] = sorted(ts)[len(ts) // 2]
            print(f"{shape:15s} {table:22s} slimkern {med['slimkern_cpp'] * 1e3:7.3f} ms  per-block "
                  f"{med['torch_per_block'] * 1e3:7.3f} ms  ratio {med['torch_per_block'] / med['slimkern_cpp']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
