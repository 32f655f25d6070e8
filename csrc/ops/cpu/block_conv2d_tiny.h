// Depthwise block_conv2d on tiny maps (the 2x2 and 1x1 maps at the end of a MobileNet on
// 16x16 or 32x32 inputs): a plane is a handful of multiply-adds, so per-plane set-up (the
// row/column range math of the plane loops, the masks of the planes) and oneDNN's NCHW
// depthwise (a few hundred MFLOP/s there) cost more than the arithmetic. The (output pixel,
// input pixel, tap) terms of the geometry are listed once per call, and every (image,
// channel) plane walks the list: forward out[o] += w[t] x[i], input gradient
// gx[i] += w[t] go[o], weight gradient gw[t] += go[o] x[i].
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "slimkern/block_checks.h"

namespace slimkern::cpu {

// Terms per plane up to which the tiny engine runs (3x3 taps, padding 1: 16 terms on 2x2 maps).
constexpr int64_t kTinyMaxTerms = 36;

// Number of valid (output pixel, input pixel, tap) terms of a depthwise geometry.
int64_t tiny_term_count(const ConvGeom& G);

at::Tensor tiny_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const ConvGeom& G, c10::IntArrayRef offs);

// gx is uninitialised on entry; gw / gb are zero-initialised full-size tensors.
void tiny_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb);

}  // namespace slimkern::cpu
