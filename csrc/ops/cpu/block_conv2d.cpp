// CPU kernels of slimkern::block_conv2d and its backward. The engines, chosen per call
// (choose_path below says when and why):
//  * per-image GEMMs for 1x1 (block_conv2d_pointwise.cpp, on sgemm.h for float32):
//    read the weight slice and x's channel window in place and write straight into the
//    output's channel window;
//  * oneDNN by runs of blocks (block_conv2d_runs.cpp): one (grouped) at::convolution per run,
//    channels last on AVX-512 where NCHW would pad the channels to 16 (channels_last_pays);
//  * depthwise float32 on AVX-512 or AVX2 (depthwise_planes.h): one task per (image, channel)
//    plane, each plane in L1; stride 2 through the stride-1 planes (stride1_geometry);
//  * depthwise float32 on maps of at most 64 pixels (8x8, 4x4, 2x2, 1x1), channels last
//    (block_conv2d_cl.h);
//  * depthwise float64: direct loops over output rows, one task per (image, channel) plane,
//    on the per-element index math of conv_math.h that the CUDA kernels share (so gradcheck
//    on CPU exercises it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "slimkern/block_checks.h"
#include "slimkern/conv_math.h"
#include "block_conv2d_cl.h"
#include "block_conv2d_maps.h"
#include "block_conv2d_pointwise.h"
#include "block_conv2d_runs.h"
#include "block_conv2d_unfold.h"
#include "depthwise_planes.h"
#include "slimkern/cpu_capability.h"
#include "sgemm.h"

namespace slimkern {
namespace {

#define SK_ALWAYS_INLINE __attribute__((always_inline)) inline

// Geometry of one depthwise plane. x planes have unit column stride and row stride sxh;
// output / grad planes are contiguous.
constexpr int64_t kMaxKW = 16;  // wider depthwise kernels take the general path
constexpr int64_t kMaxDwStride = 2;

struct Plane {
  int64_t H, W, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw, sxh;
};

template <typename T>
SK_ALWAYS_INLINE void dw_fwd_plane_impl(const T* __restrict__ x, const T* __restrict__ w, T bias,
                                        T* __restrict__ out, const Plane& g) {
  int64_t los[kMaxKW], his[kMaxKW];  // valid output columns per tap: no divisions in the row loops
  for (int64_t kw = 0; kw < g.KW; ++kw) conv_valid_out_range(g.W, g.Wo, kw, g.sw, g.pw, g.dw, &los[kw], &his[kw]);
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    T* __restrict__ row = out + oh * g.Wo;
    for (int64_t i = 0; i < g.Wo; ++i) row[i] = bias;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = conv_in_index(oh, kh, g.sh, g.ph, g.dh);
      if (ih < 0 || ih >= g.H) continue;
      const T* xrow = x + ih * g.sxh;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t lo = los[kw], hi = his[kw];
        const T wv = w[kh * g.KW + kw];
        const T* __restrict__ src = xrow + conv_in_index(lo, kw, g.sw, g.pw, g.dw);
        T* __restrict__ dst = row + lo;
        const int64_t n = hi - lo;
        if (g.sw == 1) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] += wv * src[i];
        } else {
          const int64_t s = g.sw;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] += wv * src[i * s];
        }
      }
    }
  }
}

template <typename T>
SK_ALWAYS_INLINE void dw_bwd_input_plane_impl(const T* __restrict__ go, const T* __restrict__ w,
                                              T* __restrict__ gx, const Plane& g) {
  int64_t los[kMaxKW], his[kMaxKW];  // valid output columns per tap: no divisions in the row loops
  for (int64_t kw = 0; kw < g.KW; ++kw) conv_valid_out_range(g.W, g.Wo, kw, g.sw, g.pw, g.dw, &los[kw], &his[kw]);
  // gx is a contiguous H x W plane.
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* __restrict__ grow = go + oh * g.Wo;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = conv_in_index(oh, kh, g.sh, g.ph, g.dh);
      if (ih < 0 || ih >= g.H) continue;
      T* xrow = gx + ih * g.W;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t lo = los[kw], hi = his[kw];
        const T wv = w[kh * g.KW + kw];
        T* __restrict__ dst = xrow + conv_in_index(lo, kw, g.sw, g.pw, g.dw);
        const T* __restrict__ src = grow + lo;
        const int64_t n = hi - lo;
        if (g.sw == 1) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] += wv * src[i];
        } else {
          const int64_t s = g.sw;
          for (int64_t i = 0; i < n; ++i) dst[i * s] += wv * src[i];
        }
      }
    }
  }
}

// Accumulates, per tap t and output column i, accv[t*Wo + i] += go * x (and the bias sum
// into accv[KH*KW*Wo + i]): row-wise multiply-adds with no horizontal reduction per row; the
// caller reduces accv once per weight channel.
template <typename T>
SK_ALWAYS_INLINE void dw_bwd_weight_plane_impl(const T* __restrict__ go, const T* __restrict__ x, T* __restrict__ accv,
                                               const Plane& g) {
  int64_t los[kMaxKW], his[kMaxKW];  // valid output columns per tap: no divisions in the row loops
  for (int64_t kw = 0; kw < g.KW; ++kw) conv_valid_out_range(g.W, g.Wo, kw, g.sw, g.pw, g.dw, &los[kw], &his[kw]);
  T* __restrict__ bv = accv + g.KH * g.KW * g.Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* __restrict__ grow = go + oh * g.Wo;
#pragma omp simd
    for (int64_t i = 0; i < g.Wo; ++i) bv[i] += grow[i];
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = conv_in_index(oh, kh, g.sh, g.ph, g.dh);
      if (ih < 0 || ih >= g.H) continue;
      const T* xrow = x + ih * g.sxh;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t lo = los[kw], hi = his[kw];
        const T* __restrict__ src = xrow + conv_in_index(lo, kw, g.sw, g.pw, g.dw);
        const T* __restrict__ gsrc = grow + lo;
        T* __restrict__ av = accv + (kh * g.KW + kw) * g.Wo + lo;
        const int64_t n = hi - lo;
        if (g.sw == 1) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) av[i] += gsrc[i] * src[i];
        } else {
          const int64_t st = g.sw;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) av[i] += gsrc[i] * src[i * st];
        }
      }
    }
  }
}

// Entry points that run each plane loop compiled for the capability in use
// (slimkern/cpu_capability.h: baseline, AVX2 or AVX-512).
template <typename T>
void dw_fwd_plane(const T* x, const T* w, T b, T* out, const Plane& g) {
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA { dw_fwd_plane_impl(x, w, b, out, g); });
}
template <typename T>
void dw_bwd_input_plane(const T* go, const T* w, T* gx, const Plane& g) {
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA { dw_bwd_input_plane_impl(go, w, gx, g); });
}
template <typename T>
void dw_bwd_weight_plane(const T* go, const T* x, T* accv, const Plane& g) {
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA { dw_bwd_weight_plane_impl(go, x, accv, g); });
}

bool fast_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// x with unit column stride (rows may be strided: a channel window of a wider tensor is fine).
at::Tensor unit_col(const at::Tensor& x) { return (x.stride(3) == 1 || x.size(3) == 1) ? x : x.contiguous(); }

Plane make_plane(const ConvGeom& G, int64_t sxh) {
  return Plane{G.H, G.W, G.Ho, G.Wo, G.KH, G.KW, G.sh, G.sw, G.ph, G.pw, G.dh, G.dw, sxh};
}

using cpu::channel_maps;
using cpu::gather_taps;
using cpu::invert;

// ---------------------------------------------------------------------------------------------
// depthwise

// Tap offsets of the stride-1 planes (depthwise_planes.h): the forward reads x at
// (r + kh*dh - ph, c + kw*dw - pw); the input gradient reads grad_out at the negated offsets.
struct TapOffsets {
  int64_t roff[cpu::kDwMaxTaps], coff[cpu::kDwMaxTaps];
  TapOffsets(const ConvGeom& G, int64_t sign) {
    for (int64_t kh = 0; kh < G.KH; ++kh) roff[kh] = sign * (kh * G.dh - G.ph);
    for (int64_t kw = 0; kw < G.KW; ++kw) coff[kw] = sign * (kw * G.dw - G.pw);
  }
};

cpu::DwPlane forward_plane(const ConvGeom& G, const TapOffsets& t, int64_t ld_x) {
  cpu::DwPlane g{G.H, G.W, ld_x, G.Ho, G.Wo, G.KH, G.KW, t.roff, t.coff, {}};
  cpu::dw_column_masks(g);
  return g;
}

// Strided depthwise on the stride-1 planes: the stride-s output is every s-th row and column
// of the stride-1 output (same padding and dilation), and the gradients of a stride-s conv are
// those of the stride-1 conv for a grad_out that is zero except at those positions. Each
// (image, channel) task works on one stride-1 plane in per-thread scratch (4 KB at 32x32), so
// nothing large is allocated; the stride-1 work is ~s^2 times the strided one, and still
// beats oneDNN's strided depthwise on NCHW (see choose_path).
ConvGeom stride1_geometry(const ConvGeom& G) {
  ConvGeom g1 = G;
  g1.sh = g1.sw = 1;
  g1.Ho = conv_out_size(G.H, G.KH, 1, G.ph, G.dh);
  g1.Wo = conv_out_size(G.W, G.KW, 1, G.pw, G.dw);
  return g1;
}

// out (Ho x Wo) = every (sh, sw)-th element of z (rows of width ldz).
void subsample(const float* z, int64_t ldz, int64_t sh, int64_t sw, int64_t Ho, int64_t Wo, float* out) {
  for (int64_t r = 0; r < Ho; ++r)
    for (int64_t c = 0; c < Wo; ++c) out[r * Wo + c] = z[r * sh * ldz + c * sw];
}

// The transpose of subsample into a zeroed z: only the strided positions are written, so a
// scratch plane zeroed once serves every plane of a task.
void scatter_strided(const float* g, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, int64_t ldz, float* z) {
  for (int64_t r = 0; r < Ho; ++r)
    for (int64_t c = 0; c < Wo; ++c) z[r * sh * ldz + c * sw] = g[r * Wo + c];
}

template <typename T>
void dw_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const ConvGeom& G, c10::IntArrayRef offs, bool planes, at::Tensor& out) {
  const at::Tensor x = unit_col(x_in);
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const auto taps = gather_taps<T>(weight, oc_w, G.KH, G.KW);
  const bool has_bias = bias.has_value() && bias->defined();
  const T* bp = has_bias ? bias->data_ptr<T>() : nullptr;
  const int64_t bstride = has_bias ? bias->stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const Plane pl = make_plane(G, x.stride(2));
  const TapOffsets fwd_taps(G, 1);
  const bool strided = G.sh != 1 || G.sw != 1;
  const ConvGeom G1 = stride1_geometry(G);
  const cpu::DwPlane plv = forward_plane(G1, fwd_taps, x.stride(2));
  const int64_t C = G.C_out_total, KK = G.KH * G.KW, plane = G.Ho * G.Wo;
  at::parallel_for(0, G.N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(planes && strided ? G1.Ho * G1.Wo : 0);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / C, oc = idx % C;
      const T b = has_bias ? bp[oc_w[oc] * bstride] : T(0);
      const T* xn = xp + n * x.stride(0) + oc_x[oc] * x.stride(1);
      if constexpr (std::is_same_v<T, float>) {
        if (planes) {
          cpu::dw_correlate(xn, taps.data() + oc * KK, b, false, strided ? z.data() : op + idx * plane, plv);
          if (strided) subsample(z.data(), G1.Wo, G.sh, G.sw, G.Ho, G.Wo, op + idx * plane);
          continue;
        }
      }
      dw_fwd_plane(xn, taps.data() + oc * KK, b, op + idx * plane, pl);
    }
  });
}

// Weight and bias gradients on the planes. Tasks are image ranges and planes are read
// in memory order: one task per weight channel would read planes a whole image apart, which
// the hardware prefetchers do not follow (1.5x slower at 256 channels on 16x16 maps).
// Per-thread partial sums, so overlapping blocks never race.
void dw_weight_grad_by_images(const float* gop, const at::Tensor& x, const ConvGeom& G,
                              const std::vector<int64_t>& oc_x, const std::vector<int64_t>& oc_w, int64_t Cw,
                              std::array<bool, 3> mask, at::Tensor& gw, at::Tensor& gb) {
  const int64_t C = G.C_out_total, KK = G.KH * G.KW, oplane = G.Ho * G.Wo, per = KK + 1;  // taps, then bias
  const TapOffsets fwd_taps(G, 1);
  const bool strided = G.sh != 1 || G.sw != 1;
  const ConvGeom G1 = stride1_geometry(G);
  const cpu::DwPlane pl = forward_plane(G1, fwd_taps, x.stride(2));
  // Inside a parallel region parallel_for runs inline on the caller: one partial sum then.
  const bool nested = at::in_parallel_region();
  const int64_t threads = nested ? 1 : at::get_num_threads();
  std::vector<float> parts(threads * Cw * per, 0.0f);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, G.N, 1, [&](int64_t n0, int64_t n1) {
    float* part = parts.data() + (nested ? 0 : at::get_thread_num()) * Cw * per;
    std::vector<float> gz(strided ? G1.Ho * G1.Wo : 0, 0.0f);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t oc = 0; oc < C; ++oc) {
        float* acc = part + oc_w[oc] * per;
        const float* g = gop + (n * C + oc) * oplane;
        if (strided) {
          scatter_strided(g, G.Ho, G.Wo, G.sh, G.sw, G1.Wo, gz.data());
          g = gz.data();
        }
        cpu::dw_weight_grad(g, xp + n * x.stride(0) + oc_x[oc] * x.stride(1), pl, acc, acc + KK);
      }
  });
  float* gwp = mask[1] ? gw.data_ptr<float>() : nullptr;
  float* gbp = mask[2] ? gb.data_ptr<float>() : nullptr;
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t i = 0; i < Cw * per; ++i) parts[i] += parts[t * Cw * per + i];
  for (int64_t wc = 0; wc < Cw; ++wc) {
    for (int64_t k = 0; k < KK && gwp; ++k) gwp[wc * KK + k] = parts[wc * per + k];
    if (gbp) gbp[wc] = parts[wc * per + KK];
  }
}

// gx is uninitialised on entry (every plane is written); gw / gb are zero-initialised.
template <typename T>
void dw_backward(const at::Tensor& go, const at::Tensor& x_in, const at::Tensor& weight, const ConvGeom& G,
                 c10::IntArrayRef offs, std::array<bool, 3> mask, bool planes, at::Tensor& gx, at::Tensor& gw,
                 at::Tensor& gb) {
  const at::Tensor x = unit_col(x_in);
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const auto taps = gather_taps<T>(weight, oc_w, G.KH, G.KW);
  const int64_t C = G.C_out_total, KK = G.KH * G.KW, oplane = G.Ho * G.Wo;
  const T* gop = go.data_ptr<T>();
  const Plane pl = make_plane(G, x.stride(2));
  if (mask[0]) {
    // One task per (image, x channel): every block reading that channel adds into it, so
    // overlapping x windows (shared inputs) never race.
    std::vector<int64_t> start, list;
    invert(oc_x, G.Cx, start, list);
    T* gxp = gx.data_ptr<T>();
    const int64_t iplane = G.H * G.W;
    const TapOffsets grad_taps(G, -1);
    // The input gradient correlates grad_out (Ho x Wo; strided: zero-stuffed to the stride-1
    // output's size) into a gx plane (H x W).
    const bool strided = G.sh != 1 || G.sw != 1;
    const ConvGeom G1 = stride1_geometry(G);
    cpu::DwPlane plv{G1.Ho, G1.Wo, G1.Wo, G.H, G.W, G.KH, G.KW, grad_taps.roff, grad_taps.coff, {}};
    cpu::dw_column_masks(plv);
    at::parallel_for(0, G.N * G.Cx, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> gz(planes && strided ? G1.Ho * G1.Wo : 0, 0.0f);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t n = idx / G.Cx, xc = idx % G.Cx;
        T* gxn = gxp + idx * iplane;
        if (!planes || start[xc] == start[xc + 1]) std::fill(gxn, gxn + iplane, T(0));
        for (int64_t k = start[xc]; k < start[xc + 1]; ++k) {
          const int64_t oc = list[k];
          if constexpr (std::is_same_v<T, float>) {
            if (planes) {
              const float* g = gop + (n * C + oc) * oplane;
              if (strided) {
                scatter_strided(g, G.Ho, G.Wo, G.sh, G.sw, G1.Wo, gz.data());
                g = gz.data();
              }
              cpu::dw_correlate(g, taps.data() + oc * KK, 0.0f, k > start[xc], gxn, plv);
              continue;
            }
          }
          dw_bwd_input_plane(gop + (n * C + oc) * oplane, taps.data() + oc * KK, gxn, pl);
        }
      }
    });
  }
  if ((mask[1] || mask[2]) && planes) {
    if constexpr (std::is_same_v<T, float>) dw_weight_grad_by_images(gop, x, G, oc_x, oc_w, weight.size(0), mask, gw, gb);
  } else if (mask[1] || mask[2]) {
    // One task per weight channel: overlapping blocks sum into it without races.
    const int64_t Cw = weight.size(0);
    std::vector<int64_t> start, list;
    invert(oc_w, Cw, start, list);
    const T* xp = x.data_ptr<T>();
    T* gwp = mask[1] ? gw.data_ptr<T>() : nullptr;
    T* gbp = mask[2] ? gb.data_ptr<T>() : nullptr;
    // Only the weight channels some block uses, so a prefix slice splits evenly over threads.
    std::vector<int64_t> used;
    for (int64_t wc = 0; wc < Cw; ++wc)
      if (start[wc] < start[wc + 1]) used.push_back(wc);
    at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<T> accv((KK + 1) * G.Wo);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t wc = used[u];
        std::fill(accv.begin(), accv.end(), T(0));
        for (int64_t k = start[wc]; k < start[wc + 1]; ++k) {
          const int64_t oc = list[k];
          for (int64_t n = 0; n < G.N; ++n)
            dw_bwd_weight_plane(gop + (n * C + oc) * oplane, xp + n * x.stride(0) + oc_x[oc] * x.stride(1),
                                accv.data(), pl);
        }
        for (int64_t t = 0; t <= KK; ++t) {
          T sum = 0;
          for (int64_t i = 0; i < G.Wo; ++i) sum += accv[t * G.Wo + i];
          if (t < KK && gwp) gwp[wc * KK + t] = sum;
          if (t == KK && gbp) gbp[wc] = sum;
        }
      }
    });
  }
}

bool is_pointwise(const ConvGeom& G) {
  return !G.depthwise && G.KH == 1 && G.KW == 1 && G.sh == 1 && G.sw == 1 && G.ph == 0 && G.pw == 0;
}

// Engine per call. Measured interleaved (wall time, 2 threads, batch 64, median of 7-11):
//  * per-image GEMMs (block_conv2d_pointwise.cpp) for 1x1. float32 on AVX-512 runs our own
//    kernel (sgemm.h), 1.1-1.7x faster than oneDNN's own 1x1 convolution on
//    contiguous operands and 1.4-4x faster than slice + F.conv2d + cat, forward+backward, from
//    4x4 to 32x32 maps at 64-512 channels (AMD EPYC VM; on the Intel Xeon VM 1.1-2.1x and
//    1.2-3.3x at 32-512 channels, benchmarks/results/block_ops.json). On maps of at most 16
//    pixels (4x4 to 1x1) a per-image row is at most one vector (oneDNN won by 3x below 16), so
//    the batch's pixels are gathered into one product per block: 1.2-1.85x (AVX-512) and
//    1.2-1.55x (AVX2) faster than per-switch F.conv2d + cat forward+backward on the ParaDiS
//    blocks of 307-1229 channels on 2x2 / 1x1 / 3x3 maps (batch 32-64, one thread, CPU time,
//    median of 15, under load). Through MKL's sgemm/dgemm (AVX2 on AMD) the GEMMs
//    win only while a map has more than twice as many pixels as the widest block has
//    channels (1.2-2.3x at 32-128 channels on 32x32 maps); with more channels per pixel
//    oneDNN's single GEMM over all N*H*W pixels wins by 1.1-1.5x;
//  * depthwise float32 at stride 1 on AVX-512: our planes (depthwise_planes.h), one task per
//    (image, channel) plane, 1.1-1.5x faster than oneDNN's depthwise convolution on contiguous
//    operands forward and 1.0-1.3x forward+backward, 1.2-2.3x faster than slice + F.conv2d +
//    cat (16-256 channels on 16x16 and 32x32 maps); at stride 2 (stride-1 planes subsampled,
//    zero-stuffed gradients) 1.3-1.55x faster than oneDNN forward+backward at 128-538
//    channels from 32x32 and 16x16 maps, 0.85x from 8x8 (left to oneDNN). The same planes
//    built for AVX2 (8 lanes; SLIMKERN_CPU_CAPABILITY=avx2 with oneDNN capped at AVX2 on the
//    AMD EPYC VM, batch 32, 1 thread, min of 40; ParaDiS [1.0] + [0.5, 0.5] blocks) against
//    oneDNN's AVX2 depthwise: forward 1.4-7x and backward 2.2-5.5x faster on 32x32 and 16x16
//    maps at 32-128 channels, about even at stride 2 and on 8x8, 2-3x slower on 4x4: on AVX2
//    the planes take rows of at least 16 (stride-1) output columns only;
//  * oneDNN by runs for everything else in float32 (depthwise on maps under 16 wide at stride
//    2, dense 3x3, 1x1 on 2x2 maps): one depthwise call over all packed blocks is 1.2-1.8x
//    faster than per-block calls + cat;
//  * depthwise plane loops for float64 (oneDNN has no float64 kernels).
enum class Path { kRuns, kDepthwiseLoops, kDepthwisePlanes, kDepthwiseCl, kPointwiseGemm, kUnfoldGemm };

bool gemm_pays(const at::Tensor& x, const ConvGeom& G) {
  if (x.scalar_type() == at::kFloat && cpu::have_simd_sgemm()) return true;  // maps of <= 16 pixels: gathered
  if (!cpu::have_blas_gemm() || x.numel() >= INT32_MAX) return false;  // BLAS takes 32-bit sizes and strides
  int64_t widest = 0;
  for (const auto& b : G.blocks) widest = std::max({widest, b.in_size(), b.out_size()});
  return G.H * G.W > 2 * widest;
}

// The planes: float32, taps and rows (of the stride-1 output) within their fixed-size tables
// (the input gradient writes rows W wide); strides up to kMaxDwStride (the stride-1 work grows
// as the stride squared) on rows of at least 16 columns (on 8x8 maps oneDNN's strided
// depthwise is 1.2x faster on AVX-512; on AVX2 oneDNN matches or wins below 16 columns).
bool depthwise_planes_fit(const at::Tensor& x, const ConvGeom& G) {
  const ConvGeom G1 = stride1_geometry(G);
  const bool strided = G.sh != 1 || G.sw != 1;
  // AVX2's 8-lane planes lose to oneDNN below 16 output columns (2-3x on 4x4 maps, even on 8x8).
  // On AVX-512 the planes win from 8 columns (1.5-2.4x on 8x8) but lose on 4x4 (0.6-0.8x).
  const bool narrow_ok = !strided && cpu::capability() == cpu::Capability::kAvx512 && G1.Wo >= 8;
  return G.depthwise && x.scalar_type() == at::kFloat && cpu::have_depthwise_planes() && G.sh <= kMaxDwStride &&
         G.sw <= kMaxDwStride && (narrow_ok || G1.Wo >= 16) && G.KH <= cpu::kDwMaxTaps && G.KW <= cpu::kDwMaxTaps &&
         std::max(G.W, G1.Wo) <= 16 * cpu::kDwMaxVectors;
}

// Depthwise float32 on input maps of at most 64 pixels (8x8, 4x4, 2x2, 1x1) that the planes
// do not take: channels last (block_conv2d_cl.h). Forward+backward on the packed ParaDiS
// blocks of one MobileNet layer (all four switches, batch 32-64, one thread, CPU time, median
// of 15, AMD EPYC VM under load), against what ran before:
//  * vs oneDNN by runs, AVX-512: 8x8 -> 4x4 stride 2 10.5 vs 12.5 ms; 4x4 -> 2x2 stride 2 4.7
//    vs 8.0; 4x4 stride 1 7.2 vs 21.1. AVX2: 10.3 vs 28.4, 4.6 vs 7.4, 7.8 vs 11.7, and 8x8
//    stride 1 18.7 vs 37.4. On AVX-512 the planes keep 8x8 at stride 1 (14.0 vs 17.5 ms);
//  * vs the scalar (output, input, tap) term lists it replaced on maps of at most 2x2 (which
//    beat oneDNN 3-8x there): 2x2 stride 1 6.4 vs 13.7 ms, 1x1 4.6 vs 8.9, 2x2 -> 1x1 stride 2
//    3.6 vs 6.7 (AVX-512); 5.3 vs 12.1, 4.5 vs 7.8, 3.5 vs 5.8 (AVX2).
bool cl_fits(const at::Tensor& x, const ConvGeom& G) {
  return G.depthwise && x.scalar_type() == at::kFloat && G.H * G.W <= cpu::kClMaxPixels;
}

Path choose_path(const at::Tensor& x, const ConvGeom& G) {
  if (depthwise_planes_fit(x, G)) return Path::kDepthwisePlanes;
  if (cl_fits(x, G)) return Path::kDepthwiseCl;
  if (G.depthwise && x.scalar_type() == at::kDouble && G.KW <= kMaxKW) return Path::kDepthwiseLoops;
  if (fast_dtype(x) && is_pointwise(G) && gemm_pays(x, G)) return Path::kPointwiseGemm;
  if (cpu::unfold_fits(x, G)) return Path::kUnfoldGemm;
  return Path::kRuns;
}

at::Tensor block_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef blocks, c10::IntArrayRef x_offsets, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, bool depthwise) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops on views
  const ConvGeom G = check_block_conv2d(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise);
  if (G.N == 0) return at::empty({0, G.C_out_total, G.Ho, G.Wo}, x.options());
  const Path path = choose_path(x, G);
  if (path == Path::kRuns) return cpu::runs_forward(x, weight, bias, G, x_offsets);
  if (path == Path::kPointwiseGemm) return cpu::pointwise_forward(x, weight, bias, G, x_offsets);
  if (path == Path::kDepthwiseCl) return cpu::cl_forward(x, weight, bias, G, x_offsets);
  if (path == Path::kUnfoldGemm) return cpu::unfold_forward(x, weight, bias, G, x_offsets);
  at::Tensor out = at::empty({G.N, G.C_out_total, G.Ho, G.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_cpu", [&] {
    dw_forward<scalar_t>(x, weight, bias, G, x_offsets, path == Path::kDepthwisePlanes, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef blocks,
    c10::IntArrayRef x_offsets, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    bool depthwise, std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops on views
  const ConvGeom G = check_block_conv2d(x, weight, std::nullopt, blocks, x_offsets, stride, padding, dilation,
                                        depthwise, &grad_out);
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gx = mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  at::Tensor gb = mask[2] ? at::zeros({weight.size(0)}, weight.options()) : at::empty({0}, weight.options());
  if (G.N == 0) {
    if (mask[0]) gx.zero_();
    return {gx, gw, gb};
  }
  const Path path = choose_path(x, G);
  if (path == Path::kRuns) {
    cpu::runs_backward(go, x, weight, G, x_offsets, mask, gx, gw, gb);
    return {gx, gw, gb};
  }
  if (path == Path::kPointwiseGemm) {
    cpu::pointwise_backward(go, x, weight, G, x_offsets, mask, gx, gw, gb);
    return {gx, gw, gb};
  }
  if (path == Path::kDepthwiseCl) {
    cpu::cl_backward(go, x, weight, G, x_offsets, mask, gx, gw, gb);
    return {gx, gw, gb};
  }
  if (path == Path::kUnfoldGemm) {
    cpu::unfold_backward(go, x, weight, G, x_offsets, mask, gx, gw, gb);
    return {gx, gw, gb};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_backward_cpu", [&] {
    dw_backward<scalar_t>(go, x, weight, G, x_offsets, mask, path == Path::kDepthwisePlanes, gx, gw, gb);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CPU, m) {
  m.impl("block_conv2d", &block_conv2d_cpu);
  m.impl("block_conv2d_backward", &block_conv2d_backward_cpu);
}

}  // namespace slimkern
