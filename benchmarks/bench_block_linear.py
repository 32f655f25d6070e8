"""block_linear side by side: slimkern C++ vs naive torch (pytest-benchmark), forward+backward.

Providers, on the same inputs:
  slimkern  slimkern.ops.block_linear (C++ CPU kernels, autograd in C++)
  naive     slice, F.linear per block, torch.cat (what a plain slimmable layer does)

Cases, batch 64: a ParaDiS classifier (two branches' partial logits over 1024 features, 10
classes), a sandwich-packed hidden layer (512 -> 512 at [1.0], [0.5], [0.25]) and one prefix
slice (256 -> 256 at 0.5). These layers are small, so per-call costs (Python autograd, slicing,
cat) weigh as much as the GEMMs; that is what the comparison measures.

    PYTHONPATH=. python -m pytest benchmarks/bench_block_linear.py -q \
        --benchmark-json=benchmarks/results/block_linear.json
    python benchmarks/summarize.py benchmarks/results/block_linear.json
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk
from _process import setup_allocator

THREADS = int(os.environ.get("SLIMKERN_BENCH_THREADS", "2"))
MALLOC = setup_allocator()
BATCH = 64

# name: (in features, out features, blocks)
CASES = {
    "classifier1024x10 paradis[.5,.5]": (1024, 10, [(0, 512, 0, 10), (512, 1024, 0, 10)]),
    "fc512 sandwich[1,.5,.25]": (512, 512, [(0, 512, 0, 512), (0, 256, 0, 256), (0, 128, 0, 128)]),
    "fc256 prefix0.5": (256, 256, [(0, 128, 0, 128)]),
}
PROVIDERS = ("slimkern", "naive")


def runner(provider, case):
    c_in, c_out, blocks = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, sum(b[1] - b[0] for b in blocks), generator=g).requires_grad_()
    w = (torch.randn(c_out, c_in, generator=g) * 0.05).requires_grad_()
    b = torch.randn(c_out, generator=g).requires_grad_()

    if provider == "slimkern":
        def fwd():
            return sk.ops.block_linear(x, w, b, blocks, backend="cpp")
    else:
        def fwd():
            outs, off = [], 0
            for i0, i1, o0, o1 in blocks:
                outs.append(F.linear(x[:, off:off + i1 - i0], w[o0:o1, i0:i1], b[o0:o1]))
                off += i1 - i0
            return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    grad = torch.ones_like(fwd())

    def run():
        out = fwd()
        out.backward(grad)
        return out
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_block_linear(benchmark, case, provider):
    torch.set_num_threads(THREADS)
    run = runner(provider, case)
    benchmark.group = f"block_linear fwdbwd {case}"
    benchmark.extra_info.update(provider=provider, op="block_linear", mode="fwdbwd", case=case, batch=BATCH,
                                threads=torch.get_num_threads(), malloc=MALLOC)
    benchmark.pedantic(run, rounds=200, warmup_rounds=10, iterations=1)
