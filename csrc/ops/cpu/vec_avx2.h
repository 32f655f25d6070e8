// The AVX2 + FMA vector of the per-ISA CPU kernels (depthwise planes, sgemm): 8 floats, masks
// as integer vectors for vmaskmov (lane i on when its sign bit is set). Include only after
// <immintrin.h> and `#pragma GCC target("avx2,fma")`, like vec_avx512.h.
#pragma once

namespace slimkern::cpu::avx2 {
namespace {

struct VecOps {
  using V = __m256;
  using M = __m256i;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  // AMD's vmaskmov store is microcoded (~10x a plain store): kernels use it on ragged edges only.
  static void store(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static void store_all(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float reduce(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  static M all() { return _mm256_set1_epi32(-1); }
  static M none() { return _mm256_setzero_si256(); }
  static M first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), iota());
  }
  static __m256i iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

  // out[j * ldo + i] = in[i * ld + j] for an 8 x 8 tile.
  static void transpose(const float* in, int64_t ld, float* out, int64_t ldo) {
    __m256 r[8], t[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ld);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4h + j] (j < 4), 128-bit lane L: column 4L + j of rows 4h .. 4h + 3.
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      r[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
      r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
      r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(out + j * ldo, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
      _mm256_storeu_ps(out + (4 + j) * ldo, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
    }
  }
};

}  // namespace
}  // namespace slimkern::cpu::avx2
