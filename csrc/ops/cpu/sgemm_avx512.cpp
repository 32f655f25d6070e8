// The GEMM for AVX-512: micro-tiles of 6 x 4 vectors (sgemm_kernel.h).
#include "sgemm_isa.h"

#if SK_SIMD_SGEMM
#include <immintrin.h>

// Everything below is compiled for AVX-512; only headers without inline code come before.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
// GCC 12 flags the deliberately undefined source register inside its own set1/maskz intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec_avx512.h"

namespace slimkern::cpu::avx512 {
namespace {
using Vec = VecOps;
constexpr bool kGemmPackA = false;  // 6 x 64 tiles: 4 FMAs per broadcast of A; packing it cost 8-12 %
constexpr int kGemmNV = 4;
}  // namespace
}  // namespace slimkern::cpu::avx512

#define SK_GEMM_ISA avx512
#include "sgemm_kernel.h"
#undef SK_GEMM_ISA

#endif
