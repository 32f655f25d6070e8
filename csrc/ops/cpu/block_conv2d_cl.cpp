// Depthwise block_conv2d on small maps, channels last: see block_conv2d_cl.h.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "block_conv2d_cl.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "block_conv2d_maps.h"
#include "lanes.h"
#include "slimkern/cpu_capability.h"

namespace slimkern::cpu {
namespace {

// y[c] += a[c] * b[c] for c < C.
template <int VB>
SK_ALWAYS_INLINE void mul_add(float* y, const float* a, const float* b, int64_t C) {
  using W = Lanes<float, VB>;
  int64_t c = 0;
  for (; c + W::L <= C; c += W::L) W::store(y + c, W::load(y + c) + W::load(a + c) * W::load(b + c));
  for (; c < C; ++c) y[c] += a[c] * b[c];
}

// y[c] += a[c] for c < C.
template <int VB>
SK_ALWAYS_INLINE void add_to(float* y, const float* a, int64_t C) {
  using W = Lanes<float, VB>;
  int64_t c = 0;
  for (; c + W::L <= C; c += W::L) W::store(y + c, W::load(y + c) + W::load(a + c));
  for (; c < C; ++c) y[c] += a[c];
}

// Runs f(Width<VB>{}) compiled for the CPU capability in use.
template <typename F>
void with_width(const F& f) {
  const Capability cap = capability();
  switch (cap) {
    case Capability::kAvx512: return run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<64>{}); });
    case Capability::kAvx2: return run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<32>{}); });
    default: return run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<16>{}); });
  }
}

// The transposes go 16 channels at a time, so that every pixel's write (or read) of the
// channels-last rows is one contiguous run of 16 floats, and the 16 planes stay in L1.
constexpr int64_t kTBlock = 16;

// Image n's planes of the packed channels, [pixels, C]: t[q * C + oc] = x[n, oc_x[oc], q].
void to_channels_last(const float* xn, int64_t sxc, int64_t sxh, int64_t H, int64_t W,
                      const std::vector<int64_t>& oc_x, float* t) {
  const int64_t C = static_cast<int64_t>(oc_x.size());
  const float* planes[kTBlock];
  for (int64_t c0 = 0; c0 < C; c0 += kTBlock) {
    const int64_t nb = std::min(kTBlock, C - c0);
    for (int64_t j = 0; j < nb; ++j) planes[j] = xn + oc_x[c0 + j] * sxc;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        float* row = t + (h * W + w) * C + c0;
        for (int64_t j = 0; j < nb; ++j) row[j] = planes[j][h * sxh + w];
      }
  }
}

// Back to contiguous planes: dst[oc * P + q] = t[q * C + oc] (add: +=).
void from_channels_last(const float* t, int64_t C, int64_t P, bool add, float* dst,
                        const std::vector<int64_t>* oc_plane = nullptr) {
  for (int64_t c0 = 0; c0 < C; c0 += kTBlock) {
    const int64_t nb = std::min(kTBlock, C - c0);
    float* planes[kTBlock];
    for (int64_t j = 0; j < nb; ++j) planes[j] = dst + (oc_plane ? (*oc_plane)[c0 + j] : c0 + j) * P;
    for (int64_t q = 0; q < P; ++q) {
      const float* row = t + q * C + c0;
      if (add)
        for (int64_t j = 0; j < nb; ++j) planes[j][q] += row[j];
      else
        for (int64_t j = 0; j < nb; ++j) planes[j][q] = row[j];
    }
  }
}

// Taps as [KK, C]: w_t[t * C + oc] = weight[oc_w[oc], t].
std::vector<float> taps_channels_last(const at::Tensor& weight, const std::vector<int64_t>& oc_w, int64_t KH,
                                      int64_t KW) {
  const auto taps = gather_taps<float>(weight, oc_w, KH, KW);
  const int64_t C = static_cast<int64_t>(oc_w.size()), KK = KH * KW;
  std::vector<float> t(KK * C);
  for (int64_t oc = 0; oc < C; ++oc)
    for (int64_t k = 0; k < KK; ++k) t[k * C + oc] = taps[oc * KK + k];
  return t;
}

}  // namespace

at::Tensor cl_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const ConvGeom& G, c10::IntArrayRef offs) {
  const at::Tensor x = (x_in.stride(3) == 1 || x_in.size(3) == 1) ? x_in : x_in.contiguous();
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const int64_t C = G.C_out_total, Pi = G.H * G.W, Po = G.Ho * G.Wo;
  const auto wt = taps_channels_last(weight, oc_w, G.KH, G.KW);
  const auto terms = terms_of(G, G.W);
  std::vector<float> b0(C, 0.0f);
  if (bias.has_value() && bias->defined())
    for (int64_t oc = 0; oc < C; ++oc) b0[oc] = bias->data_ptr<float>()[oc_w[oc] * bias->stride(0)];
  at::Tensor out = at::empty({G.N, C, G.Ho, G.Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, G.N, images_per_task(G.N), [&](int64_t n0, int64_t n1) {
    std::vector<float> xt(Pi * C), ot(Po * C);
    for (int64_t n = n0; n < n1; ++n) {
      to_channels_last(xp + n * x.stride(0), x.stride(1), x.stride(2), G.H, G.W, oc_x, xt.data());
      for (int64_t o = 0; o < Po; ++o) std::copy(b0.begin(), b0.end(), ot.begin() + o * C);
      with_width([&](auto width) SK_INLINE_LAMBDA {
        constexpr int VB = decltype(width)::value;
        for (const Term& e : terms) mul_add<VB>(ot.data() + e.o * C, wt.data() + e.t * C, xt.data() + e.i * C, C);
      });
      from_channels_last(ot.data(), C, Po, false, op + n * C * Po);
    }
  });
  return out;
}

void cl_backward(const at::Tensor& go, const at::Tensor& x_in, const at::Tensor& weight, const ConvGeom& G,
                 c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb) {
  const at::Tensor x = (x_in.stride(3) == 1 || x_in.size(3) == 1) ? x_in : x_in.contiguous();
  std::vector<int64_t> oc_x, oc_w;
  channel_maps(G, offs, oc_x, oc_w);
  const int64_t C = G.C_out_total, Pi = G.H * G.W, Po = G.Ho * G.Wo, KK = G.KH * G.KW;
  const auto wt = taps_channels_last(weight, oc_w, G.KH, G.KW);
  const auto terms = terms_of(G, G.W);
  const bool want_w = mask[1] || mask[2];
  std::vector<int64_t> identity(C);  // grad_out's planes are the packed channels in order
  for (int64_t oc = 0; oc < C; ++oc) identity[oc] = oc;
  // Per-thread partial weight (KK rows) and bias (one row) gradients, [KK + 1, C] each.
  const bool nested = at::in_parallel_region();
  const int64_t threads = nested ? 1 : at::get_num_threads();
  std::vector<float> parts(want_w ? threads * (KK + 1) * C : 0, 0.0f);
  const float* xp = x.data_ptr<float>();
  const float* gop = go.data_ptr<float>();
  float* gxp = mask[0] ? gx.data_ptr<float>() : nullptr;
  at::parallel_for(0, G.N, images_per_task(G.N), [&](int64_t n0, int64_t n1) {
    float* part = want_w ? parts.data() + (nested ? 0 : at::get_thread_num()) * (KK + 1) * C : nullptr;
    std::vector<float> xt(want_w ? Pi * C : 0), gt(Po * C), gxt(gxp ? Pi * C : 0);
    for (int64_t n = n0; n < n1; ++n) {
      to_channels_last(gop + n * C * Po, Po, G.Wo, G.Ho, G.Wo, identity, gt.data());
      if (want_w) to_channels_last(xp + n * x.stride(0), x.stride(1), x.stride(2), G.H, G.W, oc_x, xt.data());
      if (gxp) std::fill(gxt.begin(), gxt.end(), 0.0f);
      with_width([&](auto width) SK_INLINE_LAMBDA {
        constexpr int VB = decltype(width)::value;
        for (const Term& e : terms) {
          if (gxp) mul_add<VB>(gxt.data() + e.i * C, wt.data() + e.t * C, gt.data() + e.o * C, C);
          if (part) mul_add<VB>(part + e.t * C, gt.data() + e.o * C, xt.data() + e.i * C, C);
        }
        if (part)
          for (int64_t o = 0; o < Po; ++o) add_to<VB>(part + KK * C, gt.data() + o * C, C);
      });
      if (gxp) {
        // Every output channel adds into the x channel it read (overlapping windows sum).
        float* gxn = gxp + n * gx.stride(0);
        for (int64_t xc = 0; xc < G.Cx; ++xc) std::fill(gxn + xc * Pi, gxn + (xc + 1) * Pi, 0.0f);
        from_channels_last(gxt.data(), C, Pi, true, gxn, &oc_x);
      }
    }
  });
  if (!want_w) return;
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t i = 0; i < (KK + 1) * C; ++i) parts[i] += parts[t * (KK + 1) * C + i];
  float* gwp = mask[1] ? gw.data_ptr<float>() : nullptr;
  float* gbp = mask[2] ? gb.data_ptr<float>() : nullptr;
  for (int64_t oc = 0; oc < C; ++oc) {
    const int64_t wc = oc_w[oc];
    for (int64_t k = 0; k < KK && gwp; ++k) gwp[wc * KK + k] += parts[k * C + oc];
    if (gbp) gbp[wc] += parts[KK * C + oc];
  }
}

}  // namespace slimkern::cpu
