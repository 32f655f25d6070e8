// Depthwise block_conv2d on small maps, channels last (block_conv2d_cl.cpp): the 8x8 to 1x1
// maps of a MobileNet's last stages, at stride 1 or 2. An NCHW plane of 16 or 64 pixels has
// rows of 4 or 8 floats, too short for the planes' vectors (depthwise_planes.h), and oneDNN's
// NCHW depthwise is slow there (the fwd+bwd of 32 x 269 planes 8x8 -> 4x4 at stride 2 took
// 6 ms). Each image's packed channels are transposed to [pixels, C] (every output channel
// gathering the x channel it reads), so that every (output pixel, input pixel, tap) term of
// the geometry is one multiply-add over C contiguous channels, in registers of the width of
// the CPU capability in use (lanes.h):
//   forward       out[o, :] += w[t, :] * x[i, :]
//   grad input    gx[i, :]  += w[t, :] * go[o, :]
//   grad weight   gw[t, :]  += go[o, :] * x[i, :]     (summed over images, per thread)
// and the results are transposed back (gx summed over the output channels reading an x
// channel, gw over the output channels sharing a weight channel). float32 only.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "slimkern/block_checks.h"

namespace slimkern::cpu {

// Input maps of at most this many pixels take the engine (where the planes do not).
constexpr int64_t kClMaxPixels = 64;

at::Tensor cl_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const ConvGeom& G, c10::IntArrayRef offs);

// gx is uninitialised on entry; gw / gb are zero-initialised full-size tensors.
void cl_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                 c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb);

}  // namespace slimkern::cpu
