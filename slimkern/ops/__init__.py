"""Kernels with a C++ CPU, CUDA and Triton implementation each (see ``python -m slimkern.info``)."""
from slimkern.ops.switchable_batch_norm import switchable_batch_norm  # noqa: F401
