// The AVX-512 vector of the per-ISA CPU kernels (depthwise planes, sgemm): 16 floats, masks in
// mask registers. Include only after <immintrin.h> and `#pragma GCC target("avx512f,...")`, in
// a file that compiles everything below that pragma for AVX-512 (see depthwise_planes.h on why
// ATen must not come after it).
#pragma once

namespace slimkern::cpu::avx512 {
namespace {

struct VecOps {
  using V = __m512;
  using M = __mmask16;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static void store_all(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  static M all() { return M(0xFFFF); }
  static M none() { return M(0); }
  static M first(int64_t n) { return n >= 16 ? all() : M((1u << n) - 1); }

  // out[j * ldo + i] = in[i * ld + j] for a 16 x 16 tile.
  static void transpose(const float* in, int64_t ld, float* out, int64_t ldo) {
    __m512 r[16], t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ld);
    // Pairs of rows interleaved per 128-bit lane, then pairs of pairs: r[4i + j], lane L, holds
    // column 4L + j of rows 4i .. 4i + 3.
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    // Output row 4L + j gathers lane L of r[j], r[4 + j], r[8 + j], r[12 + j].
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
      const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
      const __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
      _mm512_storeu_ps(out + (0 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0x88));
      _mm512_storeu_ps(out + (4 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0xDD));
      _mm512_storeu_ps(out + (8 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0x88));
      _mm512_storeu_ps(out + (12 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0xDD));
    }
  }
};

}  // namespace
}  // namespace slimkern::cpu::avx512
