// A single-threaded float32 GEMM for the per-image products of the 1x1 block convolution
// engine (block_conv2d_pointwise.cpp): one kernel source (sgemm_kernel.h) compiled for AVX-512
// and for AVX2 + FMA, run for the CPU capability in use (slimkern/cpu_capability.h).
//
// Why our own: the BLAS inside the torch wheel is MKL, which runs its AVX2 code on AMD
// processors (on the Zen 5 cores of an AMD EPYC VM that capped a GEMM at ~88 GMAC/s on two
// threads), and ATen's convolution copies a channel window to a contiguous tensor before
// calling oneDNN. This kernel reads the windows in place: on one Sapphire Rapids core (Intel
// Xeon VM) its AVX-512 build runs the three per-image products at 0.9-1.1x MKL's own AVX-512
// sgemm, and the weight gradient with long pixel rows (32x32 maps) at 1.4-1.5x. Not a general
// BLAS: operands are addressed the way the three convolution products need, and callers split
// work across threads themselves.
//
// No ATen here: the ISA files compile under a target pragma, and an inline ATen function
// compiled that way could be picked by the linker for every caller.
#pragma once

#include <cstdint>

namespace slimkern::cpu {

// True when the capability in use has a build of the kernel (AVX2 or AVX-512).
bool have_simd_sgemm();

// C(i, j) = beta * C(i, j) + sum_k A(i, k) * B(k, j), for i < M, j < N, k < K, with
//   A(i, k) = a[i * a_si + k * a_sk]   (any strides: broadcast one element at a time),
//   B(k, j) = b[k * ldb + j]           (rows of unit stride),
//   C(i, j) = c[i * ldc + j].
// beta is 0 (C is not read, may be uninitialised) or 1. Only call when have_simd_sgemm().
void simd_sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc);

// The same with B read transposed: B(k, j) = b[j * ldb + k] (columns of unit stride), e.g.
// x^T for the weight gradient, read in place. Only call when have_simd_sgemm().
void simd_sgemm_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc);

// Multiply-adds per second of a register-resident loop of this build's FMA instruction (12
// independent accumulators), one thread: the peak the GEMM and the step are measured against
// (`slimkern info`). 0 when the capability in use has no SIMD build.
double simd_fma_peak(double seconds);

}  // namespace slimkern::cpu
