// Per-element index math of a 2-d convolution, shared by the CPU and CUDA kernels.
// Output position o reads input position i = o*stride - padding + k*dilation for tap k
// (the definition of F.conv2d along one spatial axis).
#pragma once

#include <cstdint>

#include "slimkern/macros.h"

namespace slimkern {

// Output extent along one axis (floor division, as in F.conv2d).
SK_HOST_DEVICE int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                                     int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// Input coordinate read by output coordinate `o` through tap `k` (may lie in the padding).
SK_HOST_DEVICE int64_t conv_in_index(int64_t o, int64_t k, int64_t stride, int64_t padding, int64_t dilation) {
  return o * stride - padding + k * dilation;
}

// Ceil division for a >= 0 or any sign of a, b > 0.
SK_HOST_DEVICE int64_t sk_ceil_div(int64_t a, int64_t b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// The half-open range [lo, hi) of output coordinates whose tap `k` reads a valid input
// coordinate (0 <= i < in), i.e. the outputs that need no bounds check for this tap.
SK_HOST_DEVICE void conv_valid_out_range(int64_t in, int64_t out, int64_t k, int64_t stride,
                                         int64_t padding, int64_t dilation, int64_t* lo, int64_t* hi) {
  const int64_t shift = padding - k * dilation;  // i = o*stride - shift
  int64_t l = sk_ceil_div(shift, stride);        // smallest o with i >= 0
  int64_t h = sk_ceil_div(in + shift, stride);   // smallest o with i >= in
  if (l < 0) l = 0;
  if (h > out) h = out;
  if (h < l) h = l;
  *lo = l;
  *hi = h;
}

// For the input gradient: output coordinate that reads input coordinate `i` through tap
// `k`, or -1 when no output does (stride does not divide, or out of range).
SK_HOST_DEVICE int64_t conv_out_index(int64_t i, int64_t k, int64_t stride, int64_t padding, int64_t dilation,
                                      int64_t out) {
  const int64_t num = i + padding - k * dilation;
  if (num < 0 || num % stride != 0) return -1;
  const int64_t o = num / stride;
  return o < out ? o : -1;
}

}  // namespace slimkern
