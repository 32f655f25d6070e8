// Lets per-element math live in one header used by both the CPU and the CUDA kernels.
#pragma once
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif
