// Helpers shared by the plain-C++ solver cores (no torch types here: the core also
// builds standalone with CMake for the ctest unit tests).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// One binary runs the AVX2/AVX-512 loops where the CPU has them (setup.py compiles for the
// x86-64 baseline): each hot loop is an always-inline body run through
// cpu::run_vectorized, which picks the build for the capability in use
// (SLIMKERN_CPU_CAPABILITY can force a narrower one, so every path is testable anywhere).
#include "slimkern/cpu_capability.h"
#define SK_SOLVER_INLINE inline __attribute__((always_inline))

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define SK_HAVE_MXCSR 1
#endif

namespace slimkern::solvers {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// Subnormal doubles cost ~100 cycles per operation on x86; the solvers never need them
// (their contribution is below 1e-300), so flush them to zero for the duration of a solve.
class FlushDenormals {
 public:
  FlushDenormals() {
#ifdef SK_HAVE_MXCSR
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ | DAZ
#endif
  }
  ~FlushDenormals() {
#ifdef SK_HAVE_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
};

// log(sum(exp(x))) over n values with stride; -inf when every value is -inf.
inline double log_sum_exp(const double* x, int64_t n, int64_t stride = 1) {
  double mx = -kInf;
  for (int64_t i = 0; i < n; ++i) mx = x[i * stride] > mx ? x[i * stride] : mx;
  if (mx == -kInf) return -kInf;
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += std::exp(x[i * stride] - mx);
  return mx + std::log(acc);
}

}  // namespace slimkern::solvers
