// Per-element and per-channel math of switchable batch norm, shared by the CPU and
// CUDA kernels so both backends normalise, activate and reduce with the same formulas.
#pragma once

#include "slimkern/macros.h"

#include <cmath>

namespace slimkern {
namespace bn {

// The activation fused after the affine step; the schema spells these as strings.
enum Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2 };

// Written so that T may also be a GCC vector type (the CPU kernels' SIMD lanes): comparisons
// then give lane masks and "?:" selects per lane. NaN must propagate as in torch.relu/relu6,
// hence "z < 0 ? 0 : z" rather than "z > 0 ? z : 0".
template <int ACT, typename T>
SK_HOST_DEVICE T activate(T z) {
  const T zero{};
  if constexpr (ACT == kRelu) {
    return z < zero ? zero : z;
  } else if constexpr (ACT == kRelu6) {
    const T six = zero + 6;
    return z < zero ? zero : (z > six ? six : z);
  } else {
    return z;
  }
}

// The gradient d passed back through the activation at pre-activation z: zero at and
// beyond the kinks, as torch's threshold_backward (relu) and hardtanh_backward (relu6).
template <int ACT, typename T>
SK_HOST_DEVICE T mask_grad(T z, T d) {
  const T zero{};
  if constexpr (ACT == kRelu) {
    return z > zero ? d : zero;
  } else if constexpr (ACT == kRelu6) {
    const T six = zero + 6;
    return ((z > zero) & (z < six)) ? d : zero;
  } else {
    return d;
  }
}

template <int ACT, typename T>
SK_HOST_DEVICE bool passes(T z) {
  return mask_grad<ACT>(z, T(1)) != T(0);
}

template <typename T>
SK_HOST_DEVICE T activate_rt(T z, int act) {
  return act == kRelu ? activate<kRelu>(z) : (act == kRelu6 ? activate<kRelu6>(z) : z);
}

template <typename T>
SK_HOST_DEVICE bool passes_rt(T z, int act) {
  return act == kRelu ? passes<kRelu>(z) : (act == kRelu6 ? passes<kRelu6>(z) : true);
}

// The affine step folded per channel: z = x * scale + shift with scale = w * invstd and
// shift = b - mean * scale. Forward and backward both use it, so the backward's
// activation mask is computed from bit-identical pre-activations.
template <typename T>
SK_HOST_DEVICE T invstd(T var, T eps) {
#if defined(__CUDA_ARCH__)
  return T(1) / sqrt(var + eps);
#else
  return T(1) / std::sqrt(var + eps);
#endif
}

template <typename T>
SK_HOST_DEVICE void fold_affine(T mean, T inv, const T* w, const T* b, T& scale, T& shift) {
  scale = w ? w[0] * inv : inv;
  shift = (b ? b[0] : T(0)) - mean * scale;
}

// Welford state (count, mean, sum of squared deviations); combine() is Chan et al.'s
// pairwise merge, so partial results from rows, threads or blocks merge in any order.
template <typename T>
struct Welford {
  T n, mean, m2;
};

template <typename T>
SK_HOST_DEVICE Welford<T> welford_push(Welford<T> a, T x) {
  a.n += T(1);
  const T d = x - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (x - a.mean);
  return a;
}

template <typename T>
SK_HOST_DEVICE Welford<T> welford_combine(Welford<T> a, Welford<T> b) {
  if (a.n == T(0)) return b;
  if (b.n == T(0)) return a;
  const T n = a.n + b.n;
  const T d = b.mean - a.mean;
  const T fb = b.n / n;
  return Welford<T>{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// Sums of (x - K) and (x - K)^2 over n values turned into a Welford state; the shift K
// (a value of the same channel) keeps the one-pass sums free of cancellation.
template <typename T>
SK_HOST_DEVICE Welford<T> welford_from_shifted(T n, T K, T s, T q) {
  if (n == T(0)) return Welford<T>{T(0), T(0), T(0)};
  const T m = s / n;
  T m2 = q - s * m;
  if (m2 < T(0)) m2 = T(0);
  return Welford<T>{n, K + m, m2};
}

// torch's running-statistics update: r <- (1 - f) r + f s, where f is the momentum, or
// 1 / count for the cumulative moving average (momentum=None), and s uses the unbiased
// variance n / (n - 1) * var.
template <typename T>
SK_HOST_DEVICE T running_update(T old, T stat, T factor) {
  return (T(1) - factor) * old + factor * stat;
}

template <typename T>
SK_HOST_DEVICE T unbiased(T var, T n) {
  return n > T(1) ? var * n / (n - T(1)) : var;
}

}  // namespace bn
}  // namespace slimkern
