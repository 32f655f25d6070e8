// Depthwise block_conv2d on tiny maps by listed terms: see block_conv2d_tiny.h.
#include "block_conv2d_tiny.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "block_conv2d_maps.h"
#include "slimkern/conv_math.h"

namespace slimkern::cpu {
namespace {

// x with unit column stride (rows may be strided: a channel window of a wider tensor is fine).
at::Tensor unit_col(const at::Tensor& x) { return (x.stride(3) == 1 || x.size(3) == 1) ? x : x.contiguous(); }

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const ConvGeom& G, c10::IntArrayRef offs, at::Tensor& out) {
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const auto taps = gather_taps<T>(weight, oc_w, G.KH, G.KW);
  const auto terms = terms_of(G, x.stride(2));
  const bool has_bias = bias.has_value() && bias->defined();
  const T* bp = has_bias ? bias->data_ptr<T>() : nullptr;
  const int64_t bstride = has_bias ? bias->stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t C = G.C_out_total, KK = G.KH * G.KW, plane = G.Ho * G.Wo;
  at::parallel_for(0, G.N * C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / C, oc = idx % C;
      const T* xn = xp + n * x.stride(0) + oc_x[oc] * x.stride(1);
      const T* w = taps.data() + oc * KK;
      T* o = op + idx * plane;
      std::fill(o, o + plane, has_bias ? bp[oc_w[oc] * bstride] : T(0));
      for (const Term& e : terms) o[e.o] += w[e.t] * xn[e.i];
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb) {
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const int64_t C = G.C_out_total, KK = G.KH * G.KW, oplane = G.Ho * G.Wo;
  const T* gop = go.data_ptr<T>();
  if (mask[0]) {
    // gx planes are contiguous (H x W): the input index of a term is re-listed with row stride W.
    const auto terms = terms_of(G, G.W);
    const auto taps = gather_taps<T>(weight, oc_w, G.KH, G.KW);
    // One task per (image, x channel): every block reading that channel adds into it, so
    // overlapping x windows never race.
    std::vector<int64_t> start, list;
    invert(oc_x, G.Cx, start, list);
    T* gxp = gx.data_ptr<T>();
    const int64_t iplane = G.H * G.W;
    at::parallel_for(0, G.N * G.Cx, 256, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t n = idx / G.Cx, xc = idx % G.Cx;
        T* g = gxp + idx * iplane;
        std::fill(g, g + iplane, T(0));
        for (int64_t k = start[xc]; k < start[xc + 1]; ++k) {
          const int64_t oc = list[k];
          const T* w = taps.data() + oc * KK;
          const T* d = gop + (n * C + oc) * oplane;
          for (const Term& e : terms) g[e.i] += w[e.t] * d[e.o];
        }
      }
    });
  }
  if (mask[1] || mask[2]) {
    // Per-thread partial sums over image ranges (overlapping blocks share weight channels).
    const auto terms = terms_of(G, x.stride(2));
    const int64_t Cw = weight.size(0), per = KK + 1;  // taps, then bias
    const bool nested = at::in_parallel_region();
    const int64_t threads = nested ? 1 : at::get_num_threads();
    std::vector<T> parts(threads * Cw * per, T(0));
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, G.N, 1, [&](int64_t n0, int64_t n1) {
      T* part = parts.data() + (nested ? 0 : at::get_thread_num()) * Cw * per;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t oc = 0; oc < C; ++oc) {
          T* acc = part + oc_w[oc] * per;
          const T* d = gop + (n * C + oc) * oplane;
          const T* xn = xp + n * x.stride(0) + oc_x[oc] * x.stride(1);
          for (const Term& e : terms) acc[e.t] += d[e.o] * xn[e.i];
          for (int64_t o = 0; o < oplane; ++o) acc[KK] += d[o];
        }
    });
    for (int64_t t = 1; t < threads; ++t)
      for (int64_t i = 0; i < Cw * per; ++i) parts[i] += parts[t * Cw * per + i];
    T* gwp = mask[1] ? gw.data_ptr<T>() : nullptr;
    T* gbp = mask[2] ? gb.data_ptr<T>() : nullptr;
    for (int64_t wc = 0; wc < Cw; ++wc) {
      for (int64_t k = 0; k < KK && gwp; ++k) gwp[wc * KK + k] = parts[wc * per + k];
      if (gbp) gbp[wc] = parts[wc * per + KK];
    }
  }
}

}  // namespace

int64_t tiny_term_count(const ConvGeom& G) { return static_cast<int64_t>(terms_of(G, G.W).size()); }

at::Tensor tiny_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const ConvGeom& G, c10::IntArrayRef offs) {
  const at::Tensor x = unit_col(x_in);
  at::Tensor out = at::empty({G.N, G.C_out_total, G.Ho, G.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_tiny", [&] {
    forward_impl<scalar_t>(x, weight, bias, G, offs, out);
  });
  return out;
}

void tiny_backward(const at::Tensor& go, const at::Tensor& x_in, const at::Tensor& weight, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb) {
  const at::Tensor x = unit_col(x_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_tiny_backward", [&] {
    backward_impl<scalar_t>(go, x, weight, G, offs, mask, gx, gw, gb);
  });
}

}  // namespace slimkern::cpu
