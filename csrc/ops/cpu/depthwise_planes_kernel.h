// The depthwise plane kernels, written once over `Vec` (a vector of Vec::L floats with masked
// loads and stores) and compiled once per instruction set: each ISA file defines
// SK_DW_ISA (its namespace) and its Vec there, sets its target pragma, then includes this.
// No include guard on purpose; no includes either (see depthwise_planes.h on ATen).

namespace slimkern::cpu::SK_DW_ISA {
namespace {

constexpr int kL = Vec::L;
// Column masks of one vector of every tap, for Wout up to 16 * kDwMaxVectors columns.
constexpr int64_t kMaxVecs = 16 * kDwMaxVectors / kL;

// An R-row x NV-vector block of the output: R * NV independent FMA chains (up to 8), since one
// accumulator per output vector would wait on the FMA latency at every tap. K > 0 fixes K x K
// taps at compile time (the 3x3 of every MobileNet), so masks, offsets and the row's weights
// sit in registers (on AVX-512; AVX2's 16 registers spill some masks); K = 0 reads the taps from g.
template <int R, int NV, int K>
void correlate_block(const float* in, const float* w, typename Vec::V vb, bool accumulate, float* out,
                     const DwPlane& g, int64_t r0, int64_t v0, typename Vec::M last, int64_t nv) {
  using V = typename Vec::V;
  using M = typename Vec::M;
  constexpr int64_t kMaxKW = K > 0 ? K : kDwMaxTaps;
  const int64_t KH = K > 0 ? K : g.KH, KW = K > 0 ? K : g.KW;
  V acc[R][NV];
  M om[NV], mk[NV][kMaxKW];
  int64_t co[kMaxKW];
#pragma GCC unroll 16
  for (int64_t kw = 0; kw < KW; ++kw) co[kw] = kL * v0 + g.coff[kw];
#pragma GCC unroll 2
  for (int j = 0; j < NV; ++j) {
    om[j] = v0 + j == nv - 1 ? last : Vec::all();
#pragma GCC unroll 16
    for (int64_t kw = 0; kw < KW; ++kw) mk[j][kw] = Vec::column(g, v0 + j, kw);
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? Vec::add(vb, Vec::load(om[j], out + (r0 + i) * g.Wout + kL * (v0 + j))) : vb;
  for (int64_t kh = 0; kh < KH; ++kh) {
    V wv[kMaxKW];
#pragma GCC unroll 16
    for (int64_t kw = 0; kw < KW; ++kw) wv[kw] = Vec::set1(w[kh * KW + kw]);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t ir = r0 + i + g.roff[kh];
      if (ir < 0 || ir >= g.Hin) continue;
      const float* irow = in + ir * g.ld_in;
#pragma GCC unroll 16
      for (int64_t kw = 0; kw < KW; ++kw)
#pragma GCC unroll 2
        for (int j = 0; j < NV; ++j)
          acc[i][j] = Vec::fma(wv[kw], Vec::load(mk[j][kw], irow + co[kw] + kL * j), acc[i][j]);
    }
  }
  // Masked stores only where a row ends inside the vector: AMD's vmaskmov store is
  // microcoded (~10x a plain store), which would dominate the 9 FMAs of a 3x3 vector.
  bool partial[NV];
#pragma GCC unroll 2
  for (int j = 0; j < NV; ++j) partial[j] = v0 + j == nv - 1 && g.Wout % kL != 0;
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      float* dst = out + (r0 + i) * g.Wout + kL * (v0 + j);
      if (partial[j]) {
        Vec::store(dst, om[j], acc[i][j]);
      } else {
        Vec::store_all(dst, acc[i][j]);
      }
    }
}

template <int R, int K>
void correlate_rows(int vecs, const float* in, const float* w, typename Vec::V vb, bool accumulate, float* out,
                    const DwPlane& g, int64_t r0, int64_t v0, typename Vec::M last, int64_t nv) {
  if (vecs >= 2) return correlate_block<R, 2, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv);
  correlate_block<R, 1, K>(in, w, vb, accumulate, out, g, r0, v0, last, nv);
}

template <int K>
void correlate_plane(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g) {
  const int64_t nv = (g.Wout + kL - 1) / kL;
  const auto last = Vec::first(g.Wout - (nv - 1) * kL);
  const auto vb = Vec::set1(bias);
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

// KH_ / KW_ > 0 fix the taps at compile time, so the accumulators live in registers (3x3:
// 9 + 1 vectors); 0 reads them from g.
template <int KH_, int KW_>
void weight_grad_plane(const float* go, const float* in, const DwPlane& g, float* gw, float* gb) {
  using V = typename Vec::V;
  using M = typename Vec::M;
  const int64_t KH = KH_ > 0 ? KH_ : g.KH, KW = KW_ > 0 ? KW_ : g.KW;
  const int64_t nv = (g.Wout + kL - 1) / kL;
  const M last = Vec::first(g.Wout - (nv - 1) * kL);
  // The column masks in the vector's own form, once per plane (AVX2 builds them from bits).
  M cm[KW_ > 0 ? kMaxVecs * KW_ : kMaxVecs * kDwMaxTaps];
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t kw = 0; kw < KW; ++kw) cm[v * KW + kw] = Vec::column(g, v, kw);
  V acc[KH_ > 0 ? KH_ * KW_ : kDwMaxTaps * kDwMaxTaps];
  for (int64_t t = 0; t < KH * KW; ++t) acc[t] = Vec::zero();
  V accb = Vec::zero();
  for (int64_t r = 0; r < g.Hout; ++r) {
    const float* grow = go + r * g.Wout;
    for (int64_t v = 0; v < nv; ++v) {
      const V gv = Vec::load(v == nv - 1 ? last : Vec::all(), grow + kL * v);
      accb = Vec::add(accb, gv);
#pragma GCC unroll 16
      for (int64_t kh = 0; kh < KH; ++kh) {
        // Rows outside the input load nothing (mask 0) rather than branch: a branch here kept
        // GCC from holding the accumulators in registers.
        const int64_t ir = r + g.roff[kh];
        const bool inside = ir >= 0 && ir < g.Hin;
        const float* irow = in + (inside ? ir : 0) * g.ld_in + kL * v;
        const M* mk = cm + v * KW;
#pragma GCC unroll 16
        for (int64_t kw = 0; kw < KW; ++kw)
          acc[kh * KW + kw] = Vec::fma(gv, Vec::load(inside ? mk[kw] : Vec::none(), irow + g.coff[kw]), acc[kh * KW + kw]);
      }
    }
  }
  for (int64_t t = 0; t < KH * KW; ++t) gw[t] += Vec::reduce(acc[t]);
  *gb += Vec::reduce(accb);
}

}  // namespace

void correlate(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g) {
  if (g.KH == 3 && g.KW == 3) return correlate_plane<3>(in, w, bias, accumulate, out, g);
  correlate_plane<0>(in, w, bias, accumulate, out, g);
}

void weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb) {
  if (g.KH == 3 && g.KW == 3) return weight_grad_plane<3, 3>(go, in, g, gw, gb);
  weight_grad_plane<0, 0>(go, in, g, gw, gb);
}

}  // namespace slimkern::cpu::SK_DW_ISA
