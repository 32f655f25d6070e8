"""``python -m slimkern.info`` / ``slimkern info``: what was built and what runs.

Reports the torch and CUDA versions the extension was built against, for each op which
backends have kernels (C++ CPU, CUDA, Triton), and a clear message when the running
torch differs from the build's (the xformers habit of ``python -m xformers.info``).
"""
from __future__ import annotations

import importlib.util
import platform

import torch

from slimkern import _library

# Ops whose public function lives in slimkern/ops/<name>.py; Triton kernels in slimkern/triton/<name>.py.
PUBLIC_OPS = ("block_conv2d", "block_linear", "switchable_batch_norm", "viterbi", "viterbi_marginals",
              "viterbi_budget", "sinkhorn")


def _has_kernel(op: str, key: str) -> bool:
    if not _library.has_op(op):
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"slimkern::{op}", key))
    except RuntimeError:
        return False


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    import triton

    return True, f"triton {triton.__version__}"


def _has_triton_kernel(op: str) -> bool:
    return importlib.util.find_spec(f"slimkern.triton.{op}") is not None


def report() -> dict:
    """Everything ``slimkern info`` prints, as a dict (also used by tests)."""
    triton_ok, triton_msg = _triton_status()
    ops = {}
    for op in PUBLIC_OPS:
        ops[op] = {
            "cpu": _has_kernel(op, "CPU"),
            "cuda": _has_kernel(op, "CUDA"),
            "triton": triton_ok and _has_triton_kernel(op),
        }
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_msg,
        "extension_loaded": _library.LOAD_ERROR is None,
        "extension_error": _library.LOAD_ERROR,
        "build": _library.build_info(),
        "cpu_capability": _library.cpu_capability(),
        "fma_peak_gmac_s": None if _library.LOAD_ERROR else _gmac(_library.fma_peak(0.2)),
        "mismatch": _library.torch_mismatch(),
        "ops": ops,
    }


def _gmac(peak: float | None) -> float | None:
    return None if peak is None else round(peak / 1e9, 1)


def _capability_line(cap: dict | None) -> str:
    if cap is None:
        return "-"
    line = f"{cap['in_use']} (processor: {cap['hardware']}"
    if cap["requested"]:
        line += f"; SLIMKERN_CPU_CAPABILITY={cap['requested']}"
    return line + ")"


def format_report(rep: dict) -> str:
    build = rep["build"] or {}
    lines = [
        f"slimkern info",
        f"  python                {rep['python']}",
        f"  torch (running)       {rep['torch']}  CUDA {rep['torch_cuda']}  GPU available: {rep['cuda_available']}",
        f"  torch (built against) {build.get('torch')}  CUDA {build.get('cuda')}  "
        f"arch list {build.get('arch_list')}",
        f"  extension slimkern._C {'loaded' if rep['extension_loaded'] else 'NOT loaded: ' + str(rep['extension_error'])}",
        f"  triton                {rep['triton']}",
        f"  CPU kernels           {_capability_line(rep['cpu_capability'])}",
        f"  FMA peak, 1 thread    "
        + (f"{rep['fma_peak_gmac_s']} GMAC/s (register-resident loop, the path above)"
           if rep.get("fma_peak_gmac_s") else "- (no SIMD build in use)"),
    ]
    if rep["mismatch"]:
        lines.append(f"  WARNING: {rep['mismatch']}")
    lines.append("")
    lines.append(f"  {'op':24s} {'CPU':6s} {'CUDA':6s} {'Triton':6s}")
    for op, b in rep["ops"].items():
        mark = lambda ok: "yes" if ok else "-"  # noqa: E731
        lines.append(f"  {op:24s} {mark(b['cpu']):6s} {mark(b['cuda']):6s} {mark(b['triton']):6s}")
    return "\n".join(lines)


def main() -> int:
    print(format_report(report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
