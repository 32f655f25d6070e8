// The GEMM for AVX2 + FMA: micro-tiles of 6 x 2 vectors, 12 of the 16 ymm registers
// (sgemm_kernel.h).
#include "sgemm_isa.h"

#if SK_SIMD_SGEMM
#include <immintrin.h>

// Everything below is compiled for AVX2 + FMA; only headers without inline code come before.
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec_avx2.h"

namespace slimkern::cpu::avx2 {
namespace {
using Vec = VecOps;
constexpr bool kGemmPackA = true;   // see the driver
constexpr int kGemmNV = 2;
}  // namespace
}  // namespace slimkern::cpu::avx2

#define SK_GEMM_ISA avx2
#include "sgemm_kernel.h"
#undef SK_GEMM_ISA

#endif
