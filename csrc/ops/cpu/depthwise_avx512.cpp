// Stride-1 depthwise planes on AVX-512: see depthwise_avx512.h.
#include "depthwise_avx512.h"

#include <cstdlib>

#include "slimkern/cpu_capability.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SK_DW_KERNEL 1
#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
// GCC 12 flags the undefined source register inside its own masked-load intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define SK_DW_KERNEL 0
#endif

namespace slimkern::cpu {

// Masked-off lanes load zero, and AVX-512 masked loads never touch (or fault on) the
// addresses of masked-off lanes, so taps past a row's ends need no special case.
void dw_column_masks(DwPlane& g) {
  const int64_t nv = (g.Wout + 15) / 16;
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      unsigned m = 0;
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t c = 16 * v + lane, ic = c + g.coff[kw];
        if (c < g.Wout && ic >= 0 && ic < g.Win) m |= 1u << lane;
      }
      g.masks[v * g.KW + kw] = static_cast<uint16_t>(m);
    }
}

#if SK_DW_KERNEL
// The AVX-512 capability in use: the processor has it and SLIMKERN_CPU_CAPABILITY does not
// ask for less.
bool have_avx512_depthwise() { return capability() == Capability::kAvx512; }

namespace {

// An R-row x V-vector block of the output: R * V independent FMA chains (up to 8), since one
// accumulator per output vector would wait on the FMA latency at every tap. K > 0 fixes K x K
// taps at compile time (the 3x3 of every MobileNet), so masks, offsets and the row's weights
// sit in registers; K = 0 reads the taps from g.
template <int R, int V, int K>
SK_AVX512 void correlate_block(const float* in, const float* w, __m512 vb, bool accumulate, float* out,
                               const DwPlane& g, int64_t r0, int64_t v0, __mmask16 last, int64_t nv) {
  constexpr int64_t kMaxKW = K > 0 ? K : kDwMaxTaps;
  const int64_t KH = K > 0 ? K : g.KH, KW = K > 0 ? K : g.KW;
  __m512 acc[R][V];
  __mmask16 om[V], mk[V][kMaxKW];
  int64_t co[kMaxKW];
#pragma GCC unroll 16
  for (int64_t kw = 0; kw < KW; ++kw) co[kw] = 16 * v0 + g.coff[kw];
#pragma GCC unroll 2
  for (int j = 0; j < V; ++j) {
    om[j] = v0 + j == nv - 1 ? last : __mmask16(0xFFFF);
#pragma GCC unroll 16
    for (int64_t kw = 0; kw < KW; ++kw) mk[j][kw] = g.masks[(v0 + j) * KW + kw];
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < V; ++j)
      acc[i][j] = accumulate ? _mm512_add_ps(vb, _mm512_maskz_loadu_ps(om[j], out + (r0 + i) * g.Wout + 16 * (v0 + j)))
                             : vb;
  for (int64_t kh = 0; kh < KH; ++kh) {
    __m512 wv[kMaxKW];
#pragma GCC unroll 16
    for (int64_t kw = 0; kw < KW; ++kw) wv[kw] = _mm512_set1_ps(w[kh * KW + kw]);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t ir = r0 + i + g.roff[kh];
      if (ir < 0 || ir >= g.Hin) continue;
      const float* irow = in + ir * g.ld_in;
#pragma GCC unroll 16
      for (int64_t kw = 0; kw < KW; ++kw)
#pragma GCC unroll 2
        for (int j = 0; j < V; ++j)
          acc[i][j] = _mm512_fmadd_ps(wv[kw], _mm512_maskz_loadu_ps(mk[j][kw], irow + co[kw] + 16 * j), acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < V; ++j) _mm512_mask_storeu_ps(out + (r0 + i) * g.Wout + 16 * (v0 + j), om[j], acc[i][j]);
}

template <int R, int K>
SK_AVX512 void correlate_rows(int vecs, const float* in, const float* w, __m512 vb, bool accumulate, float* out,
                              const DwPlane& g, int64_t r0, int64_t v0, __mmask16 last, int64_t nv) {
  if (vecs >= 2) return correlate_block<R, 2, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv);
  correlate_block<R, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv);
}

template <int K>
SK_AVX512 void correlate_plane(const float* in, const float* w, float bias, bool accumulate, float* out,
                               const DwPlane& g) {
  const int64_t nv = (g.Wout + 15) / 16;
  const __mmask16 last = g.Wout % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (g.Wout % 16)) - 1);
  const __m512 vb = _mm512_set1_ps(bias);
  // Blocks of 4 rows x 2 vectors or 8 rows x 1 vector (8 chains); rows and vectors left over
  // take smaller blocks.
  const int64_t block_rows = nv == 1 ? 8 : 4;
  for (int64_t r0 = 0; r0 < g.Hout; r0 += block_rows) {
    const int64_t rows = g.Hout - r0 < block_rows ? g.Hout - r0 : block_rows;
    for (int64_t v0 = 0; v0 < nv; v0 += 2) {
      const int vecs = static_cast<int>(nv - v0 < 2 ? nv - v0 : 2);
      switch (rows) {
        case 1: correlate_rows<1, K>(vecs, in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 2: correlate_rows<2, K>(vecs, in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 3: correlate_rows<3, K>(vecs, in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 4: correlate_rows<4, K>(vecs, in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 5: correlate_block<5, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 6: correlate_block<6, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        case 7: correlate_block<7, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
        default: correlate_block<8, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv); break;
      }
    }
  }
}

}  // namespace

SK_AVX512 void dw_correlate_avx512(const float* in, const float* w, float bias, bool accumulate, float* out,
                                   const DwPlane& g) {
  if (g.KH == 3 && g.KW == 3) return correlate_plane<3>(in, w, bias, accumulate, out, g);
  correlate_plane<0>(in, w, bias, accumulate, out, g);
}

namespace {

// KH_ / KW_ > 0 fix the taps at compile time, so the accumulators live in registers (3x3:
// 9 + 1 zmm); 0 reads them from g.
template <int KH_, int KW_>
SK_AVX512 void weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb) {
  const int64_t KH = KH_ > 0 ? KH_ : g.KH, KW = KW_ > 0 ? KW_ : g.KW;
  const __mmask16* masks = g.masks;
  const int64_t nv = (g.Wout + 15) / 16;
  const __mmask16 last = g.Wout % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (g.Wout % 16)) - 1);
  __m512 acc[KH_ > 0 ? KH_ * KW_ : kDwMaxTaps * kDwMaxTaps];
  for (int64_t t = 0; t < KH * KW; ++t) acc[t] = _mm512_setzero_ps();
  __m512 accb = _mm512_setzero_ps();
  for (int64_t r = 0; r < g.Hout; ++r) {
    const float* grow = go + r * g.Wout;
    for (int64_t v = 0; v < nv; ++v) {
      const __m512 gv = _mm512_maskz_loadu_ps(v == nv - 1 ? last : __mmask16(0xFFFF), grow + 16 * v);
      accb = _mm512_add_ps(accb, gv);
#pragma GCC unroll 16
      for (int64_t kh = 0; kh < KH; ++kh) {
        // Rows outside the input load nothing (mask 0) rather than branch: a branch here kept
        // GCC from holding the accumulators in registers.
        const int64_t ir = r + g.roff[kh];
        const bool inside = ir >= 0 && ir < g.Hin;
        const float* irow = in + (inside ? ir : 0) * g.ld_in + 16 * v;
        const __mmask16* mk = masks + v * KW;
#pragma GCC unroll 16
        for (int64_t kw = 0; kw < KW; ++kw)
          acc[kh * KW + kw] = _mm512_fmadd_ps(
              gv, _mm512_maskz_loadu_ps(inside ? mk[kw] : __mmask16(0), irow + g.coff[kw]), acc[kh * KW + kw]);
      }
    }
  }
  for (int64_t t = 0; t < KH * KW; ++t) gw[t] += _mm512_reduce_add_ps(acc[t]);
  *gb += _mm512_reduce_add_ps(accb);
}

}  // namespace

SK_AVX512 void dw_weight_grad_avx512(const float* go, const float* in, const DwPlane& g, float* gw, float* gb) {
  if (g.KH == 3 && g.KW == 3) return weight_grad<3, 3>(go, in, g, gw, gb);
  weight_grad<0, 0>(go, in, g, gw, gb);
}

#else  // no AVX-512 kernels in this build: callers take the other engines, these are never reached

bool have_avx512_depthwise() { return false; }
void dw_correlate_avx512(const float*, const float*, float, bool, float*, const DwPlane&) { std::abort(); }
void dw_weight_grad_avx512(const float*, const float*, const DwPlane&, float*, float*) { std::abort(); }

#endif

}  // namespace slimkern::cpu
