"""Kernels with a C++ CPU, CUDA and Triton implementation each (see ``python -m slimkern.info``)."""
