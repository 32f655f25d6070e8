// Dense float32 block_conv2d as GEMMs on unfolded columns: see block_conv2d_unfold.h.
#include "block_conv2d_unfold.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "block_conv2d_maps.h"
#include "sgemm.h"

namespace slimkern::cpu {
namespace {

// Layers whose every block reads fewer input channels than this, on input maps of at least
// this many pixels, take the unfolded GEMMs: the stem (3 channels) and narrow layers, where
// oneDNN's convolutions run at 5-11 GMAC/s (4 channels, 32x32, one thread) and ATen copies the
// windows around them. Stem of MobileNet-v1 / ResNet-20 on 32x32 (3 -> 32 packed ParaDiS
// channels, stride 2, batch 64, two threads, fwd+bwd): 1.87x oneDNN by runs on AVX2, 1.89x on
// AVX-512. Wider blocks stay on oneDNN: on blocks of 8-32 channels (bench_block_ops.py,
// conv16@32 / conv32@32, two threads, AVX2) this engine ran 0.68-0.87x the dense limit where
// oneDNN by runs ran 0.81-1.0x; its products there are too shallow in the output channels.
// Split by product (one 16-channel 32x32 layer, batch 64, one thread, AVX2, against oneDNN by
// runs): forward 0.80-0.98x, input gradient 0.58-0.61x and weight gradient 0.58-0.75x for
// blocks of 8 and 16 channels. The input gradient's fold_add is the first thing to replace (a
// stride-1 layer's input gradient is a convolution of unfolded go with the flipped weights).
constexpr int64_t kUnfoldMaxChannels = 8;
constexpr int64_t kUnfoldMinPixels = 1024;

// Output rows per work item: the item's columns (Ci*KH*KW rows of rows*Wo floats) stay under
// this many floats (256 KB), so the GEMM reads them back from L2.
constexpr int64_t kColsFloats = 64 * 1024;

// Output columns [lo, hi) whose tap kw falls inside the input row: 0 <= ow*sw + kw*dw - pw < W.
struct ColRange {
  int64_t lo, hi, shift;  // shift: the input column of output column 0 (may be negative)
};

ColRange col_range(const ConvGeom& G, int64_t kw) {
  const int64_t shift = kw * G.dw - G.pw;
  const int64_t lo = shift >= 0 ? 0 : (-shift + G.sw - 1) / G.sw;
  const int64_t hi = G.W - shift <= 0 ? 0 : std::min(G.Wo, (G.W - 1 - shift) / G.sw + 1);
  return {std::min(lo, hi), hi, shift};
}

// Walks the (column row, output row) pairs of an unfold of Ci channels over output rows
// [oh0, oh1): f(row of the columns, input row offset in the plane or -1 when the tap row falls
// on the padding, column range).
template <typename F>
void for_each_tap_row(int64_t Ci, const ConvGeom& G, int64_t xs1, int64_t rs, int64_t oh0, int64_t oh1, const F& f) {
  const int64_t np = (oh1 - oh0) * G.Wo;
  for (int64_t c = 0; c < Ci; ++c)
    for (int64_t kh = 0; kh < G.KH; ++kh)
      for (int64_t kw = 0; kw < G.KW; ++kw) {
        const ColRange r = col_range(G, kw);
        const int64_t row = ((c * G.KH + kh) * G.KW + kw) * np;
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const int64_t ih = oh * G.sh - G.ph + kh * G.dh;
          const int64_t at = row + (oh - oh0) * G.Wo;
          f(at, ih >= 0 && ih < G.H ? c * xs1 + ih * rs : -1, r);
        }
      }
}

// cols[d, (oh - oh0) * Wo + ow] = x[c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw], 0 outside.
void unfold(const float* x, int64_t xs1, int64_t rs, int64_t Ci, const ConvGeom& G, int64_t oh0, int64_t oh1,
            float* cols) {
  for_each_tap_row(Ci, G, xs1, rs, oh0, oh1, [&](int64_t at, int64_t in, const ColRange& r) {
    float* out = cols + at;
    if (in < 0) {
      std::fill_n(out, G.Wo, 0.0f);
      return;
    }
    std::fill(out, out + r.lo, 0.0f);
    const int64_t i0 = in + r.shift;  // x[i0 + ow * sw] for ow in [lo, hi): inside the row
    if (G.sw == 1) {
      std::copy(x + (i0 + r.lo), x + (i0 + r.hi), out + r.lo);  // i0 alone may be negative
    } else {
      for (int64_t ow = r.lo; ow < r.hi; ++ow) out[ow] = x[i0 + ow * G.sw];
    }
    std::fill(out + r.hi, out + G.Wo, 0.0f);
  });
}

// The adjoint: gx[c, ih, iw] += cols[d, p] for every (d, p) that unfold reads it into.
void fold_add(const float* cols, int64_t xs1, int64_t rs, int64_t Ci, const ConvGeom& G, int64_t oh0, int64_t oh1,
              float* gx) {
  for_each_tap_row(Ci, G, xs1, rs, oh0, oh1, [&](int64_t at, int64_t in, const ColRange& r) {
    if (in < 0) return;
    const float* from = cols + at;
    const int64_t i0 = in + r.shift;
    if (G.sw == 1) {
      for (int64_t ow = r.lo; ow < r.hi; ++ow) gx[i0 + ow] += from[ow];
    } else {
      for (int64_t ow = r.lo; ow < r.hi; ++ow) gx[i0 + ow * G.sw] += from[ow];
    }
  });
}

// Work items are (image, band of output rows); a task takes a contiguous range of them.
struct Bands {
  int64_t rows, per_image;
};

Bands bands_of(const ConvGeom& G) {
  int64_t depth = 0;
  for (const auto& b : G.blocks) depth = std::max(depth, b.in_size() * G.KH * G.KW);
  const int64_t most = std::clamp<int64_t>(kColsFloats / std::max<int64_t>(depth * G.Wo, 1), 1, G.Ho);
  const int64_t per_image = (G.Ho + most - 1) / most;
  const int64_t rows = (G.Ho + per_image - 1) / per_image;  // bands of equal height: no short tail
  return {rows, (G.Ho + rows - 1) / rows};
}

// A task's buffers, reused across its items: unfolded x, the input gradient's columns, one
// item's weight gradient.
struct Scratch {
  std::vector<float> cols, dcols, wtmp;
};

template <typename F>
void for_items(const ConvGeom& G, const Bands& B, const F& f) {
  const int64_t items = G.N * B.per_image;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  at::parallel_for(0, items, std::max<int64_t>(1, (items + threads - 1) / threads), [&](int64_t i0, int64_t i1) {
    Scratch sc;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / B.per_image, oh0 = i % B.per_image * B.rows;
      f(n, oh0, std::min(G.Ho, oh0 + B.rows), sc);
    }
  });
}

// x with unit column stride (rows and channels may be strided: a window of a wider tensor).
at::Tensor unit_columns(const at::Tensor& x) { return x.stride(3) == 1 || x.size(3) == 1 ? x : x.contiguous(); }

}  // namespace

bool unfold_fits(const at::Tensor& x, const ConvGeom& G) {
  if (G.depthwise || (G.KH == 1 && G.KW == 1) || G.H * G.W < kUnfoldMinPixels || x.scalar_type() != at::kFloat ||
      !have_simd_sgemm())
    return false;
  for (const auto& b : G.blocks)
    if (b.in_size() >= kUnfoldMaxChannels) return false;
  return true;
}

at::Tensor unfold_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                          const ConvGeom& G, c10::IntArrayRef offs) {
  const at::Tensor x = unit_columns(x_in);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({G.N, G.C_out_total, G.Ho, G.Wo}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const float* bp = has_bias ? bc.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t KK = G.KH * G.KW, ws0 = weight.stride(0), Po = G.Ho * G.Wo;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), rs = x.size(2) == 1 ? G.W : x.stride(2);
  const Bands B = bands_of(G);
  for_items(G, B, [&](int64_t n, int64_t oh0, int64_t oh1, Scratch& sc) {
    std::vector<float>& cols = sc.cols;
    const int64_t np = (oh1 - oh0) * G.Wo;
    int64_t pos = 0;
    for (size_t g = 0; g < G.blocks.size(); ++g) {
      const Block& b = G.blocks[g];
      const int64_t Ci = b.in_size(), Co = b.out_size(), D = Ci * KK;
      cols.resize(D * np);
      unfold(xp + n * xs0 + offs[g] * xs1, xs1, rs, Ci, G, oh0, oh1, cols.data());
      float* on = op + (n * G.C_out_total + pos) * Po + oh0 * G.Wo;
      if (bp)
        for (int64_t o = 0; o < Co; ++o) std::fill_n(on + o * Po, np, bp[b.out_start + o]);
      simd_sgemm(Co, np, D, wp + b.out_start * ws0 + b.in_start * KK, ws0, 1, cols.data(), np, bp ? 1.0f : 0.0f,
                 on, Po);
      pos += Co;
    }
  });
  return out;
}

void unfold_backward(const at::Tensor& go, const at::Tensor& x_in, const at::Tensor& weight_in, const ConvGeom& G,
                     c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw,
                     at::Tensor& gb) {
  const at::Tensor x = unit_columns(x_in);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t KK = G.KH * G.KW, ws0 = weight.stride(0), Po = G.Ho * G.Wo, C = G.C_out_total;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), rs = x.size(2) == 1 ? G.W : x.stride(2);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* gop = go.data_ptr<float>();
  // Windows may overlap (blocks sharing inputs): every block adds into a zeroed gx.
  if (mask[0]) gx.zero_();
  float* gxp = mask[0] ? gx.data_ptr<float>() : nullptr;
  const int64_t gxs0 = mask[0] ? gx.stride(0) : 0, gxs1 = mask[0] ? gx.stride(1) : 0;
  // Per-thread partial weight gradients in double, block after block ([Co x Ci*KK] row-major
  // each), so overlapping blocks and images never race. Each work item's product is taken in
  // float (beta 0) and added in, so a float sum never runs over more than one band of one
  // image, whatever the batch. Nested inside a parallel region, parallel_for runs inline on a
  // caller whose thread number may exceed get_num_threads(): one part then.
  std::vector<int64_t> part_at(G.blocks.size() + 1, 0);
  for (size_t g = 0; g < G.blocks.size(); ++g)
    part_at[g + 1] = part_at[g] + G.blocks[g].out_size() * G.blocks[g].in_size() * KK;
  const bool nested = at::in_parallel_region();
  const int64_t threads = nested ? 1 : at::get_num_threads();
  at::Tensor parts = mask[1] ? at::zeros({threads, part_at.back()}, go.options().dtype(at::kDouble)) : at::Tensor();
  double* pp = mask[1] ? parts.data_ptr<double>() : nullptr;
  const Bands B = bands_of(G);
  if (mask[0] || mask[1]) {
    for_items(G, B, [&](int64_t n, int64_t oh0, int64_t oh1, Scratch& sc) {
      std::vector<float>& cols = sc.cols;
      std::vector<float>& dcols = sc.dcols;
      std::vector<float>& wtmp = sc.wtmp;
      double* acc = pp ? pp + (nested ? 0 : at::get_thread_num()) * part_at.back() : nullptr;
      const int64_t np = (oh1 - oh0) * G.Wo;
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        const int64_t Ci = b.in_size(), Co = b.out_size(), D = Ci * KK;
        const float* wg = wp + b.out_start * ws0 + b.in_start * KK;
        const float* gon = gop + (n * C + pos) * Po + oh0 * G.Wo;
        if (acc) {
          cols.resize(D * np);
          unfold(xp + n * xs0 + offs[g] * xs1, xs1, rs, Ci, G, oh0, oh1, cols.data());
          wtmp.resize(Co * D);
          simd_sgemm_bt(Co, D, np, gon, Po, 1, cols.data(), np, 0.0f, wtmp.data(), D);
          double* a = acc + part_at[g];
          for (int64_t i = 0; i < Co * D; ++i) a[i] += wtmp[i];
        }
        if (gxp) {
          dcols.resize(D * np);
          simd_sgemm(D, np, Co, wg, 1, ws0, gon, Po, 0.0f, dcols.data(), np);
          fold_add(dcols.data(), gxs1, G.W, Ci, G, oh0, oh1, gxp + n * gxs0 + offs[g] * gxs1);
        }
        pos += Co;
      }
    });
  }
  if (mask[1]) {
    const at::Tensor total = parts.sum(0).to(at::kFloat);
    for (size_t g = 0; g < G.blocks.size(); ++g) {
      const Block& b = G.blocks[g];
      gw.narrow(0, b.out_start, b.out_size()).narrow(1, b.in_start, b.in_size()).add_(
          total.narrow(0, part_at[g], part_at[g + 1] - part_at[g]).view({b.out_size(), b.in_size(), G.KH, G.KW}));
    }
  }
  if (mask[2]) add_bias_grad(go, G, gb);
}

}  // namespace slimkern::cpu
