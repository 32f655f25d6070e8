"""Triton kernels, used on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1 in tests).

Importing a module here needs triton; ``slimkern.ops`` imports them lazily so a CPU-only
install never needs triton.
"""
