// The GEMM build for the CPU capability in use (see sgemm.h).
#include "sgemm.h"

#include <cstdlib>

#include "sgemm_isa.h"
#include "slimkern/cpu_capability.h"

namespace slimkern::cpu {

#if SK_SIMD_SGEMM
bool have_simd_sgemm() { return capability() != Capability::kDefault; }

void simd_sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc) {
  if (capability() == Capability::kAvx512) return avx512::sgemm(M, N, K, a, a_si, a_sk, b, ldb, beta, c, ldc);
  avx2::sgemm(M, N, K, a, a_si, a_sk, b, ldb, beta, c, ldc);
}

void simd_sgemm_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc) {
  if (capability() == Capability::kAvx512) return avx512::sgemm_bt(M, N, K, a, a_si, a_sk, b, ldb, beta, c, ldc);
  avx2::sgemm_bt(M, N, K, a, a_si, a_sk, b, ldb, beta, c, ldc);
}
#else  // no x86 builds: callers take the BLAS path, these are never reached
bool have_simd_sgemm() { return false; }
void simd_sgemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*,
                int64_t) {
  std::abort();
}
void simd_sgemm_bt(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*,
                   int64_t) {
  std::abort();
}
#endif

}  // namespace slimkern::cpu
