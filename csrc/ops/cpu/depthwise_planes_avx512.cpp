// The depthwise planes for AVX-512: 16 lanes, masks in mask registers (depthwise_planes.h).
#include "depthwise_planes_isa.h"

#if SK_DW_PLANES
#include <immintrin.h>

// Everything below is compiled for AVX-512; only headers without inline code come before.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
// GCC 12 flags the deliberately undefined source register inside its own masked-load intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace slimkern::cpu::avx512 {
namespace {

struct Vec {
  using V = __m512;
  using M = __mmask16;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static void store_all(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float reduce(V v) { return _mm512_reduce_add_ps(v); }
  static M all() { return M(0xFFFF); }
  static M none() { return M(0); }
  static M first(int64_t n) { return n >= 16 ? all() : M((1u << n) - 1); }
  static M column(const DwPlane& g, int64_t v, int64_t kw) { return g.masks[v * g.KW + kw]; }
};

}  // namespace
}  // namespace slimkern::cpu::avx512

#define SK_DW_ISA avx512
#include "depthwise_planes_kernel.h"
#undef SK_DW_ISA

#endif
