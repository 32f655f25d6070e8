"""Kernels with a C++ CPU, CUDA and Triton implementation each (see ``python -m slimkern.info``)."""
from slimkern.ops.block_conv2d import block_conv2d  # noqa: E402,F401
from slimkern.ops.block_linear import block_linear  # noqa: E402,F401
from slimkern.ops.switchable_batch_norm import switchable_batch_norm  # noqa: E402,F401
