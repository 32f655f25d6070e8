// Switchable batch norm on CPU: tasks (at::parallel_for) take tiles of adjacent channels and
// walk them image after image: whole planes with one set of sums per channel on maps of 64
// pixels and more, segments of per-element sums below. Statistics in one pass (shifted sums,
// float lanes flushed to double), normalise + affine + activation fused in a second pass; the
// backward fuses the activation mask into both reductions and the input gradient. x is read
// as [N, Cp, HW].
// GCC vector types (lanes.h) live in inline helpers only; no ABI crosses this file.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "slimkern/bn_checks.h"
#include "slimkern/cpu_capability.h"
#include "lanes.h"

namespace slimkern {
namespace {

using namespace bn;

// Float partial sums are flushed to double every kChunk values of a row, which bounds
// their rounding error whatever the map size.
constexpr int64_t kChunk = 1024;

// The backward's float lanes are flushed more often: every this many values a lane (GradSums).
constexpr int64_t kGradChunkPerLane = 32;

// SIMD lanes (lanes.h) of the register width of the capability in use, per loop body.
using cpu::Lanes;
using cpu::Width;

// Two running sums kept in SIMD lanes across rows and flushed to double every kChunk values.
template <typename T, int VB>
struct Sums2 {
  using W = Lanes<T, VB>;
  typename W::V a{}, b{};
  T ta = 0, tb = 0;
  int64_t pending = 0;
  double A = 0, B = 0;
  SK_ALWAYS_INLINE void flush() {
    A += W::sum(a) + ta;
    B += W::sum(b) + tb;
    a = typename W::V{};
    b = typename W::V{};
    ta = tb = 0;
    pending = 0;
  }
  SK_ALWAYS_INLINE void rowdone(int64_t n) {
    pending += n;
    if (pending >= kChunk) flush();
  }
};

// The backward's sums of g and g * (x - K), in float lanes flushed every kGradChunkPerLane
// values a lane; in eval mode sum g goes to double lanes vector by vector (EXACT_G). A
// gradient of one sign over a whole plane adds up without cancelling, and in eval mode sum g
// is then multiplied by (K - running mean), far from 0: with float lanes the weight gradient
// ended 15x further from float64 than torch's own batch norm (300 images of 9x13 maps, mean
// 50, a linear ramp of output gradients; float sums of even 4 vectors before the double were
// 7x). Training shifts by (K - batch mean), a few standard deviations, and keeps the float
// lanes: the doubles cost 15 % on 32x32 maps.
template <typename T, int VB>
struct GradSums {
  using W = Lanes<T, VB>;
  alignas(64) double a[W::L] = {};
  typename W::V af{}, b{};
  double ta = 0, A = 0, B = 0;
  T tb = 0;
  int64_t pending = 0;
  SK_ALWAYS_INLINE void flush_floats() {
    A += W::sum(af);
    B += W::sum(b) + tb;
    af = b = typename W::V{};
    tb = 0;
    pending = 0;
  }
  SK_ALWAYS_INLINE void rowdone(int64_t n) {
    pending += n;
    if (pending >= kGradChunkPerLane * W::L) flush_floats();
  }
  SK_ALWAYS_INLINE void flush() {
    flush_floats();
    A += ta;
    for (int j = 0; j < W::L; ++j) A += a[j];
  }
};

template <int VB, typename T>
SK_ALWAYS_INLINE void shifted_sums(const T* p, int64_t n, T K, Sums2<T, VB>& acc) {
  using W = Lanes<T, VB>;
  using V = typename W::V;
  int64_t i = 0;
  for (; i + W::L <= n; i += W::L) {
    const V v = W::load(p + i) - K;
    acc.a += v;
    acc.b += v * v;
  }
  for (; i < n; ++i) {
    const T v = p[i] - K;
    acc.ta += v;
    acc.tb += v * v;
  }
  acc.rowdone(n);
}

template <int ACT, int VB, typename T>
SK_ALWAYS_INLINE void apply_row(const T* x, T* y, int64_t n, T scale, T shift) {
  using W = Lanes<T, VB>;
  int64_t i = 0;
  for (; i + W::L <= n; i += W::L) W::store(y + i, activate<ACT>(W::load(x + i) * scale + shift));
  for (; i < n; ++i) y[i] = activate<ACT>(x[i] * scale + shift);
}

// Sums of g and g * (x - K) over one row, g = dy masked by the activation.
template <int ACT, int VB, bool EXACT_G, typename T>
SK_ALWAYS_INLINE void grad_sums(const T* x, const T* dy, int64_t n, T scale, T shift, T K,
                                GradSums<T, VB>& acc) {
  using W = Lanes<T, VB>;
  using V = typename W::V;
  int64_t i = 0;
  for (; i + W::L <= n; i += W::L) {
    const V xv = W::load(x + i);
    const V g = mask_grad<ACT>(xv * scale + shift, W::load(dy + i));
    if constexpr (EXACT_G)
      W::add_to(acc.a, g);
    else
      acc.af += g;
    acc.b += g * (xv - K);
  }
  for (; i < n; ++i) {
    const T g = mask_grad<ACT>(x[i] * scale + shift, dy[i]);
    acc.ta += g;
    acc.tb += g * (x[i] - K);
  }
  acc.rowdone(n);
}

// dx = scale * g + k1 * (x - mean) + k0 (k1 = k0 = 0 in eval mode).
template <int ACT, int VB, typename T>
SK_ALWAYS_INLINE void grad_x_row(const T* x, const T* dy, T* dx, int64_t n, T scale, T shift, T mean, T k1, T k0) {
  using W = Lanes<T, VB>;
  using V = typename W::V;
  int64_t i = 0;
  for (; i + W::L <= n; i += W::L) {
    const V xv = W::load(x + i);
    const V g = mask_grad<ACT>(xv * scale + shift, W::load(dy + i));
    W::store(dx + i, scale * g + k1 * (xv - mean) + k0);
  }
  for (; i < n; ++i) {
    const T g = mask_grad<ACT>(x[i] * scale + shift, dy[i]);
    dx[i] = scale * g + k1 * (x[i] - mean) + k0;
  }
}


// Small maps (HW < kSegmentBelow): a channel's rows are shorter than a few registers, so the
// per-channel loops above run mostly in their scalar tails (a 2x2 map is 4 floats a row).
// A task then takes a tile of channels [c0, c0 + w), whose rows are adjacent in every image:
// x[n, c0:c0+w, :] is one segment of E = w * HW values, and element e of it belongs to channel
// c0 + e / HW. Per-channel constants are expanded to per-element arrays once per tile; every
// loop then walks the segments image after image, front to back, whole vectors at a time.
constexpr int64_t kSegmentBelow = 64;
constexpr int64_t kSegment = 1024;  // values per segment: a tile of 1024 / HW channels

struct SegSums {
  alignas(64) double A[kSegment], B[kSegment];
};

// Sums over images n of f(n, e) -> (a, b) for every element e < E of the segment, into S.A / S.B.
// Image after image, each one's segment is walked front to back (E contiguous values) and its
// lanes are added, converted to double, to the element's sums, which stay in L1: walking
// one vector column down all N images instead (a stride of Cp * HW values per step) ran at
// 2-3 ns a value on 4x4 maps, 15x a copy's time. The lanes are summed in double: float
// partial sums of even 32 images lost 5-20x the accuracy of torch's own batch norm (which sums
// in double) on 1x1 maps, where a channel's whole sum is one lane's.
template <int VB, typename T, typename F>
SK_ALWAYS_INLINE void segment_sums(int64_t N, int64_t E, SegSums& S, const F& f) {
  using W = Lanes<T, VB>;
  using V = typename W::V;
  std::fill(S.A, S.A + E, 0.0);
  std::fill(S.B, S.B + E, 0.0);
  const int64_t Ev = E - E % W::L;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = 0; e < Ev; e += W::L) {
      V da, db;
      f(n, e, da, db);
      W::add_to(S.A + e, da);
      W::add_to(S.B + e, db);
    }
    for (int64_t e = Ev; e < E; ++e) {
      T da, db;
      f(n, e, da, db);
      S.A[e] += da;
      S.B[e] += db;
    }
  }
}

// Channel j of the tile: the sums of its HW elements.
SK_ALWAYS_INLINE void channel_sums(const SegSums& S, int64_t j, int64_t HW, double& a, double& b) {
  a = b = 0;
  for (int64_t k = 0; k < HW; ++k) {
    a += S.A[j * HW + k];
    b += S.B[j * HW + k];
  }
}

template <typename T>
SK_ALWAYS_INLINE void expand(T* e, int64_t j, int64_t HW, T v) {
  for (int64_t k = 0; k < HW; ++k) e[j * HW + k] = v;
}

// Over images n (outer, each segment walked front to back): g(n, e, v) for every element e < E,
// with v one vector (or one value in the tail).
template <int VB, typename T, typename G>
SK_ALWAYS_INLINE void segment_apply(int64_t N, int64_t E, const G& g) {
  using W = Lanes<T, VB>;
  const int64_t Ev = E - E % W::L;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = 0; e < Ev; e += W::L) g(n, e, typename W::V{});
    for (int64_t e = Ev; e < E; ++e) g(n, e, T{});
  }
}

// Read-only views of the affine parameters and statistics rows through their strides.
template <typename T>
struct Params {
  const T* w = nullptr;
  const T* b = nullptr;
  int64_t ws = 0, bs = 0;
  const T* w_at(int64_t c) const { return w ? w + c * ws : nullptr; }
  const T* b_at(int64_t c) const { return b ? b + c * bs : nullptr; }
};

template <typename T>
Params<T> params_of(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  Params<T> P;
  if (weight.has_value() && weight->defined()) {
    P.w = weight->data_ptr<T>();
    P.ws = weight->stride(0);
  }
  if (bias.has_value() && bias->defined()) {
    P.b = bias->data_ptr<T>();
    P.bs = bias->stride(0);
  }
  return P;
}

// The channel loops are compiled for the x86-64 baseline, AVX2 and AVX-512, each with its
// register width, and the build for the capability in use runs (slimkern/cpu_capability.h:
// the widest the CPU has, or what SLIMKERN_CPU_CAPABILITY asks for). f(width, p0, p1) takes
// the width as a compile-time constant; the lambda bodies are always_inline so they take the
// wrapper's instruction set.
template <typename F>
void run_channels(int64_t C, int64_t grain, const F& f) {
  const cpu::Capability cap = cpu::capability();
  at::parallel_for(0, C, grain, [&](int64_t p0, int64_t p1) {
    switch (cap) {
      case cpu::Capability::kAvx512:
        return cpu::run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<64>{}, p0, p1); });
      case cpu::Capability::kAvx2:
        return cpu::run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<32>{}, p0, p1); });
      default:
        return cpu::run_for_capability(cap, [&]() SK_INLINE_LAMBDA { f(Width<16>{}, p0, p1); });
    }
  });
}

// Maps of kSegmentBelow pixels and more: a task walks tiles of channels whose planes are
// adjacent in every image, image after image, so each image's read is one run of about
// kPlaneRun values rather than one plane (a 16x16 plane is 1 KB, the next one a whole image
// of channels away). Every channel keeps its own sums, summed in the same order as one
// channel at a time.
constexpr int64_t kPlaneRun = 1024;
constexpr int64_t kPlaneTile = kPlaneRun / kSegmentBelow;  // the most channels of a tile

inline int64_t plane_tile(int64_t HW) {
  return std::clamp<int64_t>(kPlaneRun / std::max<int64_t>(HW, 1), 1, kPlaneTile);
}

// Walks the planes of channels [c0, c0 + w) image after image, front to back: f(j, offset of
// the plane of channel c0 + j).
template <typename F>
SK_ALWAYS_INLINE void tile_planes(int64_t N, int64_t Cp, int64_t HW, int64_t c0, int64_t w, const F& f) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < w; ++j) f(j, (n * Cp + c0 + j) * HW);
}

inline int64_t grain_for(int64_t per_channel) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_channel));
}

template <typename T, int ACT>
void forward_kernel(const Layout& L, const at::Tensor& x, at::Tensor& y, at::Tensor& smean, at::Tensor& svar,
                    const Params<T>& P, const at::Tensor& rm, const at::Tensor& rv, bool training, double eps) {
  const int64_t N = L.N, Cp = L.Cp, HW = L.HW;
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* mp = smean.data_ptr<T>();
  T* vp = svar.data_ptr<T>();
  const T* rmp = rm.data_ptr<T>();
  const T* rvp = rv.data_ptr<T>();
  const int64_t rm0 = rm.stride(0), rm1 = rm.stride(1), rv0 = rv.stride(0), rv1 = rv.stride(1);
  const double cnt = static_cast<double>(N * HW);
  const T teps = static_cast<T>(eps);

  // Channel statistics: batch (training) or the block's stat row (eval).
  auto stats_from_sums = [&](double K, double S, double Q, T& mean, T& var) {
    const double m = S / cnt;
    double v = Q / cnt - m * m;
    mean = static_cast<T>(K + m);
    var = static_cast<T>(v < 0 ? 0 : v);
  };
  // Saves channel p's statistics and folds them with its affine parameters.
  auto keep_stats = [&](int64_t p, T mean, T var, T& scale, T& shift) {
    mp[p] = mean;
    vp[p] = var;
    fold_affine(mean, invstd(var, teps), P.w_at(L.chan_full[p]), P.b_at(L.chan_full[p]), scale, shift);
  };
  auto eval_stats = [&](int64_t p, T& mean, T& var) {
    const int64_t r = L.chan_row[p], c = L.chan_full[p];
    mean = rmp[r * rm0 + c * rm1];
    var = rvp[r * rv0 + c * rv1];
  };

  if (HW > 0 && HW < kSegmentBelow) {  // (an empty map takes the loops below: no division by HW)
    const int64_t tile = std::max<int64_t>(1, kSegment / HW);
    const auto seg_body = [&](auto width, int64_t p0, int64_t p1) SK_INLINE_LAMBDA {
      constexpr int VB = decltype(width)::value;
      using W = Lanes<T, VB>;
      using V = typename W::V;
      alignas(64) T Ke[kSegment], sc[kSegment], sh[kSegment];
      SegSums S;
      for (int64_t c0 = p0; c0 < p1; c0 += tile) {
        const int64_t w = std::min(tile, p1 - c0), E = w * HW;
        const T* x0 = xp + c0 * HW;  // image n's segment starts n * Cp * HW further
        T* y0 = yp + c0 * HW;
        const int64_t rs = Cp * HW;
        if (training) {
          for (int64_t j = 0; j < w; ++j) expand(Ke, j, HW, x0[j * HW]);
          segment_sums<VB, T>(N, E, S, [&](int64_t n, int64_t e, auto& da, auto& db) SK_INLINE_LAMBDA {
            using U = std::remove_reference_t<decltype(da)>;
            U v;
            if constexpr (std::is_same_v<U, V>) v = W::load(x0 + n * rs + e) - W::load(Ke + e);
            else v = x0[n * rs + e] - Ke[e];
            da = v;
            db = v * v;
          });
        }
        for (int64_t j = 0; j < w; ++j) {
          const int64_t p = c0 + j;
          T mean, var;
          if (training) {
            double a, b;
            channel_sums(S, j, HW, a, b);
            stats_from_sums(Ke[j * HW], a, b, mean, var);
          } else {
            eval_stats(p, mean, var);
          }
          T scale, shift;
          keep_stats(p, mean, var, scale, shift);
          expand(sc, j, HW, scale);
          expand(sh, j, HW, shift);
        }
        segment_apply<VB, T>(N, E, [&](int64_t n, int64_t e, auto tag) SK_INLINE_LAMBDA {
          if constexpr (std::is_same_v<decltype(tag), V>)
            W::store(y0 + n * rs + e, activate<ACT>(W::load(x0 + n * rs + e) * W::load(sc + e) + W::load(sh + e)));
          else
            y0[n * rs + e] = activate<ACT>(x0[n * rs + e] * sc[e] + sh[e]);
        });
      }
    };
    run_channels(Cp, std::max(tile, grain_for(N * HW)), seg_body);
    return;
  }

  const int64_t tile = plane_tile(HW);
  const auto body = [&](auto width, int64_t p0, int64_t p1) SK_INLINE_LAMBDA {
    constexpr int VB = decltype(width)::value;
    for (int64_t c0 = p0; c0 < p1; c0 += tile) {
      const int64_t w = std::min(tile, p1 - c0);
      T mean[kPlaneTile], var[kPlaneTile], scale[kPlaneTile], shift[kPlaneTile];
      if (training) {
        T K[kPlaneTile];
        Sums2<T, VB> acc[kPlaneTile];
        for (int64_t j = 0; j < w; ++j) K[j] = xp[(c0 + j) * HW];
        tile_planes(N, Cp, HW, c0, w, [&](int64_t j, int64_t off) SK_INLINE_LAMBDA {
          shifted_sums<VB>(xp + off, HW, K[j], acc[j]);
        });
        for (int64_t j = 0; j < w; ++j) {
          acc[j].flush();
          stats_from_sums(K[j], acc[j].A, acc[j].B, mean[j], var[j]);
        }
      } else {
        for (int64_t j = 0; j < w; ++j) eval_stats(c0 + j, mean[j], var[j]);
      }
      for (int64_t j = 0; j < w; ++j) keep_stats(c0 + j, mean[j], var[j], scale[j], shift[j]);
      tile_planes(N, Cp, HW, c0, w, [&](int64_t j, int64_t off) SK_INLINE_LAMBDA {
        apply_row<ACT, VB>(xp + off, yp + off, HW, scale[j], shift[j]);
      });
    }
  };
  run_channels(Cp, std::max(tile, grain_for(N * HW)), body);
}

template <typename T, int ACT>
void backward_kernel(const Layout& L, const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx,
                     std::vector<double>& gw, std::vector<double>& gb, const Params<T>& P,
                     const at::Tensor& smean, const at::Tensor& svar, bool training, double eps) {
  const int64_t N = L.N, Cp = L.Cp, HW = L.HW;
  const T* xp = x.data_ptr<T>();
  const T* gp = dy.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const T* mp = smean.data_ptr<T>();
  const T* vp = svar.data_ptr<T>();
  const double cnt = static_cast<double>(N * HW);
  const T teps = static_cast<T>(eps);

  // Sum g * (x - mean) is taken as sum g * (x - K) + (K - mean) * sum g, with K a value of the
  // channel (its first): the float products stay small when the mean is far from the data
  // (eval mode with running statistics), as the forward's shifted sums do.
  auto shift_back = [](T K, T mean, double sum_g) { return (static_cast<double>(K) - mean) * sum_g; };
  // Per channel: inv, scale, shift and, from the two sums, the dx coefficients k1, k0.
  auto coeffs = [&](int64_t p, T& inv, T& scale, T& shift) {
    inv = invstd(vp[p], teps);
    fold_affine(mp[p], inv, P.w_at(L.chan_full[p]), P.b_at(L.chan_full[p]), scale, shift);
  };
  auto finish = [&](int64_t p, T inv, T scale, double SG, double SGX, T& k1, T& k0) {
    gw[p] = SGX * static_cast<double>(inv);
    gb[p] = SG;
    if (training) {
      k1 = static_cast<T>(-static_cast<double>(scale) * inv * inv * SGX / cnt);
      k0 = static_cast<T>(-static_cast<double>(scale) * SG / cnt);
    } else {
      k1 = T(0);
      k0 = T(0);
    }
  };

  if (HW > 0 && HW < kSegmentBelow) {  // (an empty map takes the loops below: no division by HW)
    const int64_t tile = std::max<int64_t>(1, kSegment / HW);
    const auto seg_body = [&](auto width, int64_t p0, int64_t p1) SK_INLINE_LAMBDA {
      constexpr int VB = decltype(width)::value;
      using W = Lanes<T, VB>;
      using V = typename W::V;
      alignas(64) T me[kSegment], Ke[kSegment], sc[kSegment], sh[kSegment], k1e[kSegment], k0e[kSegment];
      T inv[kSegment];
      SegSums S;
      for (int64_t c0 = p0; c0 < p1; c0 += tile) {
        const int64_t w = std::min(tile, p1 - c0), E = w * HW, rs = Cp * HW;
        const T* x0 = xp + c0 * HW;
        const T* g0 = gp + c0 * HW;
        T* d0 = dxp + c0 * HW;
        for (int64_t j = 0; j < w; ++j) {
          T scale, shift;
          coeffs(c0 + j, inv[j], scale, shift);
          expand(me, j, HW, mp[c0 + j]);
          expand(Ke, j, HW, N > 0 ? x0[j * HW] : mp[c0 + j]);  // (an empty batch reads no x)
          expand(sc, j, HW, scale);
          expand(sh, j, HW, shift);
        }
        segment_sums<VB, T>(N, E, S, [&](int64_t n, int64_t e, auto& da, auto& db) SK_INLINE_LAMBDA {
          using U = std::remove_reference_t<decltype(da)>;
          if constexpr (std::is_same_v<U, V>) {
            const V xv = W::load(x0 + n * rs + e);
            const V g = mask_grad<ACT>(xv * W::load(sc + e) + W::load(sh + e), W::load(g0 + n * rs + e));
            da = g;
            db = g * (xv - W::load(Ke + e));
          } else {
            const T xv = x0[n * rs + e];
            const T g = mask_grad<ACT>(xv * sc[e] + sh[e], g0[n * rs + e]);
            da = g;
            db = g * (xv - Ke[e]);
          }
        });
        for (int64_t j = 0; j < w; ++j) {
          double a, b;
          channel_sums(S, j, HW, a, b);
          T k1, k0;
          finish(c0 + j, inv[j], sc[j * HW], a, b + shift_back(Ke[j * HW], me[j * HW], a), k1, k0);
          expand(k1e, j, HW, k1);
          expand(k0e, j, HW, k0);
        }
        segment_apply<VB, T>(N, E, [&](int64_t n, int64_t e, auto tag) SK_INLINE_LAMBDA {
          if constexpr (std::is_same_v<decltype(tag), V>) {
            const V xv = W::load(x0 + n * rs + e), s = W::load(sc + e);
            const V g = mask_grad<ACT>(xv * s + W::load(sh + e), W::load(g0 + n * rs + e));
            W::store(d0 + n * rs + e, s * g + W::load(k1e + e) * (xv - W::load(me + e)) + W::load(k0e + e));
          } else {
            const T xv = x0[n * rs + e];
            const T g = mask_grad<ACT>(xv * sc[e] + sh[e], g0[n * rs + e]);
            d0[n * rs + e] = sc[e] * g + k1e[e] * (xv - me[e]) + k0e[e];
          }
        });
      }
    };
    run_channels(Cp, std::max(tile, grain_for(N * HW)), seg_body);
    return;
  }

  const int64_t tile = plane_tile(HW);
  const auto body = [&](auto width, int64_t p0, int64_t p1) SK_INLINE_LAMBDA {
    constexpr int VB = decltype(width)::value;
    for (int64_t c0 = p0; c0 < p1; c0 += tile) {
      const int64_t w = std::min(tile, p1 - c0);
      T inv[kPlaneTile], scale[kPlaneTile], shift[kPlaneTile], mean[kPlaneTile], K[kPlaneTile];
      T k1[kPlaneTile], k0[kPlaneTile];
      GradSums<T, VB> acc[kPlaneTile];
      for (int64_t j = 0; j < w; ++j) {
        const int64_t p = c0 + j;
        coeffs(p, inv[j], scale[j], shift[j]);
        mean[j] = mp[p];
        K[j] = N > 0 ? xp[p * HW] : mean[j];
      }
      tile_planes(N, Cp, HW, c0, w, [&](int64_t j, int64_t off) SK_INLINE_LAMBDA {
        if (training)
          grad_sums<ACT, VB, false>(xp + off, gp + off, HW, scale[j], shift[j], K[j], acc[j]);
        else
          grad_sums<ACT, VB, true>(xp + off, gp + off, HW, scale[j], shift[j], K[j], acc[j]);
      });
      for (int64_t j = 0; j < w; ++j) {
        acc[j].flush();
        finish(c0 + j, inv[j], scale[j], acc[j].A, acc[j].B + shift_back(K[j], mean[j], acc[j].A), k1[j], k0[j]);
      }
      tile_planes(N, Cp, HW, c0, w, [&](int64_t j, int64_t off) SK_INLINE_LAMBDA {
        grad_x_row<ACT, VB>(xp + off, gp + off, dxp + off, HW, scale[j], shift[j], mean[j], k1[j], k0[j]);
      });
    }
  };
  run_channels(Cp, std::max(tile, grain_for(N * HW)), body);
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "switchable_batch_norm on CPU supports float32 and float64, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, c10::IntArrayRef blocks,
    c10::IntArrayRef stat_rows, bool training, double eps, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Layout L = check_forward(x_in, weight, bias, running_mean, running_var, blocks, stat_rows, training);
  check_cpu_dtype(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor smean = at::empty({L.Cp}, x.options());
  at::Tensor svar = at::empty({L.Cp}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "switchable_batch_norm_forward_cpu", [&] {
    const auto P = params_of<scalar_t>(weight, bias);
    dispatch_activation(act, [&](auto a) {
      forward_kernel<scalar_t, decltype(a)::value>(L, x, y, smean, svar, P, running_mean, running_var, training,
                                                    eps);
    });
  });
  return {y, smean, svar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    c10::IntArrayRef blocks, int64_t num_channels, bool training, double eps, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Layout L = check_backward(grad_y, x_in, weight, bias, save_mean, save_var, blocks, num_channels);
  check_cpu_dtype(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<double> gw(L.Cp, 0.0), gb(L.Cp, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "switchable_batch_norm_backward_cpu", [&] {
    const auto P = params_of<scalar_t>(weight, bias);
    dispatch_activation(act, [&](auto a) {
      backward_kernel<scalar_t, decltype(a)::value>(L, dy, x, dx, gw, gb, P, save_mean.contiguous(),
                                                     save_var.contiguous(), training, eps);
    });
  });
  // The affine parameters are shared: a channel's gradient sums over every block using it.
  std::vector<double> gw_full(L.C, 0.0), gb_full(L.C, 0.0);
  for (int64_t p = 0; p < L.Cp; ++p) {
    gw_full[L.chan_full[p]] += gw[p];
    gb_full[L.chan_full[p]] += gb[p];
  }
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor grad_w = at::from_blob(gw_full.data(), {L.C}, dopt).to(x.scalar_type());
  at::Tensor grad_b = at::from_blob(gb_full.data(), {L.C}, dopt).to(x.scalar_type());
  if (x.scalar_type() == at::kDouble) {
    grad_w = grad_w.clone();
    grad_b = grad_b.clone();
  }
  return {dx, grad_w, grad_b};
}

void update_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                      const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& save_mean,
                      const at::Tensor& save_var, c10::IntArrayRef blocks, c10::IntArrayRef stat_rows,
                      int64_t count, c10::optional<double> momentum) {
  check_cpu_dtype(running_mean);
  const Layout L = check_update_stats(running_mean, running_var, num_batches_tracked, save_mean, save_var, blocks,
                                      stat_rows, count, momentum);
  // Every check has passed: from here on the buffers are written.
  std::vector<int64_t> counts;
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    auto acc = num_batches_tracked->accessor<int64_t, 1>();
    std::vector<bool> used(L.S, false);
    for (int64_t r : L.rows) used[r] = true;
    for (int64_t r = 0; r < L.S; ++r)
      if (used[r]) acc[r] += 1;
    counts.resize(L.S);
    for (int64_t r = 0; r < L.S; ++r) counts[r] = acc[r];
  }
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "switchable_batch_norm_update_stats_cpu", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const int64_t rm0 = running_mean.stride(0), rm1 = running_mean.stride(1);
    const int64_t rv0 = running_var.stride(0), rv1 = running_var.stride(1);
    const at::Tensor m = save_mean.contiguous(), v = save_var.contiguous();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t n = static_cast<scalar_t>(count);
    for (int64_t p = 0; p < L.Cp; ++p) {
      const int64_t r = L.chan_row[p], c = L.chan_full[p];
      const scalar_t f = momentum.has_value() ? static_cast<scalar_t>(*momentum)
                                              : static_cast<scalar_t>(1.0 / static_cast<double>(counts[r]));
      scalar_t& om = rm[r * rm0 + c * rm1];
      scalar_t& ov = rv[r * rv0 + c * rv1];
      om = running_update(om, mp[p], f);
      ov = running_update(ov, unbiased(vp[p], n), f);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CPU, m) {
  m.impl("switchable_batch_norm", &forward_cpu);
  m.impl("switchable_batch_norm_backward", &backward_cpu);
  m.impl("switchable_batch_norm_update_stats_", &update_stats_cpu);
}

}  // namespace slimkern
