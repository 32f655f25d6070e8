"""Loads the compiled extension ``slimkern._C`` and says so loudly when it cannot.

Importing ``_C`` runs the TORCH_LIBRARY registrations in ``csrc/``; afterwards the ops
live under ``torch.ops.slimkern``. When the extension is missing or was built against
another torch, a RuntimeWarning says why, and each public function falls back to its
pure-torch path (slower) where it has one, or raises naming the missing op.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings

import torch

__all__ = ["LOAD_ERROR", "CPU_CAPABILITIES", "build_info", "cpu_capability", "has_op", "require_op", "torch_mismatch"]


def _load():
    # SLIMKERN_EXTENSION names another build of the extension to load instead of slimkern._C:
    # `make test-sanitize` runs the tests against the sanitizer build in build/sanitize/.
    other = os.environ.get("SLIMKERN_EXTENSION", "")
    try:
        if other:
            torch.ops.load_library(other)
        else:
            importlib.import_module("slimkern._C")  # runs the op registrations
    except (ImportError, OSError) as exc:  # missing build, or an ABI mismatch with the running torch
        return f"{type(exc).__name__}: {exc}"
    return None


LOAD_ERROR: str | None = _load()
if LOAD_ERROR is not None:
    warnings.warn(
        "slimkern: the C++ extension slimkern._C could not be loaded "
        f"({LOAD_ERROR}). Ops fall back to slower pure-torch paths where they have one. "
        "Rebuild it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_op(name: str) -> bool:
    """True when ``torch.ops.slimkern.<name>`` was registered by the loaded extension."""
    if LOAD_ERROR is not None:
        return False
    try:
        getattr(torch.ops.slimkern, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def require_op(name: str):
    """Returns ``torch.ops.slimkern.<name>`` or raises a RuntimeError that says why it is missing."""
    if not has_op(name):
        why = LOAD_ERROR or f"the extension was built without the op {name!r}"
        raise RuntimeError(f"slimkern op {name!r} is not available: {why}. Rebuild slimkern (see README).")
    return getattr(torch.ops.slimkern, name)


def build_info() -> dict | None:
    """The configuration the extension was built with: torch and CUDA versions, arch list."""
    if not has_op("_build_info"):
        return None
    return json.loads(torch.ops.slimkern._build_info())


# Values of SLIMKERN_CPU_CAPABILITY, narrowest first (csrc/include/slimkern/cpu_capability.h).
CPU_CAPABILITIES = ("default", "avx2", "avx512")


def _check_capability_request() -> None:
    requested = os.environ.get("SLIMKERN_CPU_CAPABILITY", "").strip().lower()
    if requested and requested not in CPU_CAPABILITIES:
        warnings.warn(f"SLIMKERN_CPU_CAPABILITY={requested!r} is not one of {', '.join(CPU_CAPABILITIES)}: "
                      "it is ignored and the widest instruction set the CPU has is used.",
                      RuntimeWarning, stacklevel=3)


_check_capability_request()


def fma_peak(seconds: float = 0.25) -> float | None:
    """Multiply-adds per second of one thread's register-resident FMA loop (12 independent
    vector accumulators, the FMA instruction of the CPU capability in use), measured for about
    ``seconds``: the peak a kernel's MAC/s is compared against. None without the extension or
    a SIMD build (the x86-64 baseline path)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 10:
        raise ValueError(f"seconds must be a number in (0, 10], got {seconds!r}")
    if not has_op("_fma_peak"):
        return None
    peak = float(torch.ops.slimkern._fma_peak(float(seconds)))
    return peak if peak > 0 else None


def cpu_capability() -> dict | None:
    """The instruction set the C++ CPU kernels run with.

    ``{"in_use": ..., "hardware": ..., "requested": ...}``, each one of ``CPU_CAPABILITIES``
    (``requested`` is ``""`` when ``SLIMKERN_CPU_CAPABILITY`` is unset). ``in_use`` is the
    widest the processor supports, or the narrower one ``SLIMKERN_CPU_CAPABILITY`` asks for
    (read once per process, like ATen's ``ATEN_CPU_CAPABILITY``). None without the extension.
    """
    if not has_op("_cpu_capability"):
        return None
    return json.loads(torch.ops.slimkern._cpu_capability())


def _base_version(v: str) -> str:
    return v.split("+")[0]


def torch_mismatch() -> str | None:
    """A message when the running torch differs from the one the extension was built against."""
    info = build_info()
    if info is None:
        return None
    built, running = info.get("torch", "?"), torch.__version__
    if _base_version(built) != _base_version(running) or (info.get("cuda") and info["cuda"] != torch.version.cuda):
        return (f"slimkern._C was built against torch {built} (CUDA {info.get('cuda')}) but torch "
                f"{running} (CUDA {torch.version.cuda}) is running: rebuild slimkern to match.")
    return None
