// The depthwise planes for AVX2 + FMA: 8 lanes, vmaskmov loads and stores with vector masks
// (depthwise_planes.h). Same kernel source as the AVX-512 build.
#include "depthwise_planes_isa.h"

#if SK_DW_PLANES
#include <immintrin.h>

// Everything below is compiled for AVX2 + FMA; only headers without inline code come before.
#pragma GCC target("avx2,fma")
// GCC 12 cannot see that the taps loops only read the weights they set.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace slimkern::cpu::avx2 {
namespace {

struct Vec {
  using V = __m256;
  using M = __m256i;  // lane i on when its sign bit is set (vmaskmov)
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static void store_all(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float reduce(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  static M all() { return _mm256_set1_epi32(-1); }
  static M none() { return _mm256_setzero_si256(); }
  static M first(int64_t n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), iota()); }
  // Lanes of 8-column vector v from the 16-column bit masks of dw_column_masks.
  static M column(const DwPlane& g, int64_t v, int64_t kw) {
    const int bits = (g.masks[(v >> 1) * g.KW + kw] >> (8 * (v & 1))) & 0xFF;
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane), lane);
  }
  static __m256i iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
};

}  // namespace
}  // namespace slimkern::cpu::avx2

#define SK_DW_ISA avx2
#include "depthwise_planes_kernel.h"
#undef SK_DW_ISA

#endif
