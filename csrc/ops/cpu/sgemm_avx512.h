// A single-threaded float32 GEMM on AVX-512, for the per-image products of the 1x1 block
// convolution engine (block_conv2d_pointwise.cpp).
//
// Why our own: the BLAS inside the torch wheel is MKL, which runs its AVX2 code on AMD
// processors. On the Zen 5 cores of an AMD EPYC VM that capped a GEMM at ~88 GMAC/s on two
// threads, while oneDNN's AVX-512 1x1 convolutions reach ~175 GMAC/s on contiguous inputs.
// oneDNN itself is not exported by libtorch, and ATen's convolution copies a channel window
// to a contiguous tensor before calling it. This kernel reads the window in place at AVX-512
// speed on either vendor: on one Sapphire Rapids core (Intel Xeon VM) it runs the three
// per-image products at 0.9-1.1x MKL's own AVX-512 sgemm, and the weight gradient with long
// pixel rows (32x32 maps) at 1.4-1.5x. Not a general BLAS: operands are addressed the way the
// three convolution products need, and callers split work across threads themselves.
//
// No ATen here: the .cpp compiles its functions for AVX-512 with target attributes, and an
// inline ATen function compiled that way could be picked by the linker for every caller.
#pragma once

#include <cstdint>

namespace slimkern::cpu {

// True when the running processor has AVX-512 F/BW/DQ/VL and this build carries the kernel.
bool have_avx512_sgemm();

// C(i, j) = beta * C(i, j) + sum_k A(i, k) * B(k, j), for i < M, j < N, k < K, with
//   A(i, k) = a[i * a_si + k * a_sk]   (any strides: broadcast one element at a time),
//   B(k, j) = b[k * ldb + j]           (rows of unit stride),
//   C(i, j) = c[i * ldc + j].
// beta is 0 (C is not read, may be uninitialised) or 1. Only call when have_avx512_sgemm().
void sgemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc);

// The same with B read transposed: B(k, j) = b[j * ldb + k] (columns of unit stride), e.g.
// x^T for the weight gradient, read in place. Only call when have_avx512_sgemm().
void sgemm_avx512_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace slimkern::cpu
