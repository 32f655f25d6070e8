// The per-instruction-set builds of the GEMM (sgemm_avx512.cpp, sgemm_avx2.cpp): the same
// kernel source, sgemm_kernel.h.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_SIMD_SGEMM 1
#else
#define SK_SIMD_SGEMM 0
#endif

#define SK_SGEMM_DECLS                                                                                      \
  void sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,   \
             int64_t ldb, float beta, float* c, int64_t ldc);                                               \
  void sgemm_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, \
                int64_t ldb, float beta, float* c, int64_t ldc);                                              \
  float fma_loop(int64_t iters, float x);

namespace slimkern::cpu {
namespace avx512 {
SK_SGEMM_DECLS
}  // namespace avx512
namespace avx2 {
SK_SGEMM_DECLS
}  // namespace avx2
}  // namespace slimkern::cpu

#undef SK_SGEMM_DECLS
