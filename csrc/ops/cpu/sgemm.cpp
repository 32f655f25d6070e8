// The GEMM build for the CPU capability in use (see sgemm.h).
#include "sgemm.h"

#include <chrono>
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
double simd_fma_peak(double seconds) {
  if (!have_simd_sgemm()) return 0.0;
  const bool wide = capability() == Capability::kAvx512;
  const int64_t lanes = wide ? 16 : 8;
  auto run = [&](int64_t iters) {
    volatile float sink = wide ? avx512::fma_loop(iters, 0.5f) : avx2::fma_loop(iters, 0.5f);
    (void)sink;
  };
  run(1 << 16);  // warm up (and let the clock settle on the vector unit)
  int64_t iters = 1 << 20;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    run(iters);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt >= seconds || iters >= (int64_t{1} << 40)) return static_cast<double>(iters) * 12 * lanes / dt;
    iters *= 2;
  }
}
#else  // no x86 builds: callers take the BLAS path, these are never reached
bool have_simd_sgemm() { return false; }
double simd_fma_peak(double) { return 0.0; }
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
