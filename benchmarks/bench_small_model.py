"""Small-model regime (issue 19): the scale of `slimkern demo` and of federated clients.

MobileNet-v1 width_mult 0.5 (max_width 1.2), 16x16 inputs, batch 32, one thread: the ParaDiS
and sandwich steps of ``bench_train_step.py`` (same providers, losses and interleaved timing,
wall and CPU time), at the sizes where per-layer overheads, not GEMM throughput, decide.
The JSON records the CPU capability in use; run it once per path to compare them:

    PYTHONPATH=. python benchmarks/bench_small_model.py --json benchmarks/results/small_model.json
    SLIMKERN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        PYTHONPATH=. python benchmarks/bench_small_model.py --json benchmarks/results/small_model_avx2.json
    python benchmarks/summarize.py benchmarks/results/small_model.json --base plain_torch
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as b  # noqa: E402

b.BATCH, b.THREADS, b.RES, b.MODELS = 32, 1, 16, {"mobilenet_v1": 0.5}

if __name__ == "__main__":
    sys.exit(b.main(["--rounds", "9", "--no-memory"] + sys.argv[1:]))
