// The depthwise planes for AVX2 + FMA: 8 lanes, vmaskmov loads and stores with vector masks
// (depthwise_planes.h). Same kernel source as the AVX-512 build.
#include "depthwise_planes_isa.h"

#if SK_DW_PLANES
#include <immintrin.h>

// Everything below is compiled for AVX2 + FMA; only headers without inline code come before.
#pragma GCC target("avx2,fma")
// GCC 12 cannot see that the taps loops only read the weights they set.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec_avx2.h"

namespace slimkern::cpu::avx2 {
namespace {

struct Vec : VecOps {
  // Lanes of 8-column vector v from the 16-column bit masks of dw_column_masks.
  static M column(const DwPlane& g, int64_t v, int64_t kw) {
    const int bits = (g.masks[(v >> 1) * g.KW + kw] >> (8 * (v & 1))) & 0xFF;
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane), lane);
  }
};

}  // namespace
}  // namespace slimkern::cpu::avx2

#define SK_DW_ISA avx2
#include "depthwise_planes_kernel.h"
#undef SK_DW_ISA

#endif
