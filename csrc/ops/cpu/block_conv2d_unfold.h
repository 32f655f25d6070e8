// block_conv2d for dense (not depthwise, not 1x1) float32 convolutions as per-image GEMMs on
// unfolded columns, on our GEMM (sgemm.h).
//
// Block g of image n, output rows [oh0, oh1) at a time:
//   cols (Ci*KH*KW x np)  = the block's x window unfolded (im2col; zeros where the taps fall
//                           on the padding), built in a per-task buffer that stays in L2;
//   forward       out_n[pos_g : pos_g + Co] rows = W_g (Co x Ci*KH*KW) . cols   [+ the bias]
//   grad weight   gW_g (Co x Ci*KH*KW) += go rows (Co x np) . cols^T
//   grad input    dcols = W_g^T . go rows, folded back (col2im) and added into gx's window.
// x, the output and the gradients are read and written in place through their strides: a
// channel window of the packed activation is never copied to a contiguous tensor, and the
// output is never concatenated, where ATen's convolution (oneDNN) needs both (block_conv2d_runs).
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "slimkern/block_checks.h"

namespace slimkern::cpu {

// Dense k x k (k > 1) float32 layers whose blocks all read fewer than 8 input channels (the
// stem), on input maps of at least 1024 pixels (32x32), with a SIMD build of the GEMM (AVX2
// or AVX-512).
bool unfold_fits(const at::Tensor& x, const ConvGeom& G);

at::Tensor unfold_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const ConvGeom& G, c10::IntArrayRef offs);

// gx is uninitialised on entry; gw / gb are zero-initialised full-size tensors.
void unfold_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                     c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb);

}  // namespace slimkern::cpu
