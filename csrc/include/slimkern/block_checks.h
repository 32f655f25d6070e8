// Argument checks of block_conv2d / block_linear (and their backwards), shared by every
// backend so callers of torch.ops.slimkern get the same messages on CPU and CUDA.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "slimkern/checks.h"
#include "slimkern/conv_math.h"

namespace slimkern {

struct ConvGeom {
  std::vector<Block> blocks;
  int64_t N, Cx, H, W, KH, KW, Ho, Wo, C_out_total;
  int64_t sh, sw, ph, pw, dh, dw;
  bool depthwise;
};

inline void expand2(c10::IntArrayRef v, const char* name, int64_t minimum, int64_t* a, int64_t* b) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, name, " must have 1 or 2 entries, got ", v.size());
  *a = v[0];
  *b = v[v.size() - 1];
  TORCH_CHECK(*a >= minimum && *b >= minimum, name, " must be >= ", minimum, ", got ", v);
  // The output-size arithmetic (H + 2 * padding - dilation * (k - 1) ...) must not overflow,
  // and oneDNN takes 32-bit geometry.
  constexpr int64_t kMax = 2147483647;
  TORCH_CHECK(*a <= kMax && *b <= kMax, name, " must be at most ", kMax, ", got ", v);
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t c_out) {
  if (!bias.has_value() || !bias->defined()) return;
  check_same(x, "x", *bias, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "bias must have shape [", c_out,
              "] (the weight's output channels), got ", bias->sizes());
}

// Checks everything block_conv2d needs and returns the geometry. `grad_out`, when given,
// must have the output's shape.
inline ConvGeom check_block_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, c10::IntArrayRef blocks,
                                   c10::IntArrayRef x_offsets, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                   c10::IntArrayRef dilation, bool depthwise,
                                   const at::Tensor* grad_out = nullptr) {
  check_rank(x, "x", {4});
  check_rank(weight, "weight", {4});
  check_same(x, "x", weight, "weight");
  check_floating(x, "x");
  check_bias(bias, x, weight.size(0));
  ConvGeom g;
  g.depthwise = depthwise;
  if (depthwise)
    TORCH_CHECK(weight.size(1) == 1, "a depthwise weight must have shape [C, 1, kh, kw], got ", weight.sizes());
  g.blocks = parse_blocks(blocks, depthwise ? weight.size(0) : weight.size(1), weight.size(0));
  if (depthwise) {
    for (size_t i = 0; i < g.blocks.size(); ++i) {
      const auto& b = g.blocks[i];
      TORCH_CHECK(b.in_start == b.out_start && b.in_stop == b.out_stop, "block ", i,
                  ": a depthwise block needs equal input and output ranges, got [", b.in_start, ", ", b.in_stop,
                  ") and [", b.out_start, ", ", b.out_stop, ")");
    }
  }
  check_x_offsets(g.blocks, x_offsets, x.size(1));
  expand2(stride, "stride", 1, &g.sh, &g.sw);
  expand2(padding, "padding", 0, &g.ph, &g.pw);
  expand2(dilation, "dilation", 1, &g.dh, &g.dw);
  g.N = x.size(0);
  g.Cx = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.Ho = conv_out_size(g.H, g.KH, g.sh, g.ph, g.dh);
  g.Wo = conv_out_size(g.W, g.KW, g.sw, g.pw, g.dw);
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "the input (", g.H, "x", g.W, " plus padding) is smaller than the dilated kernel (",
              g.KH, "x", g.KW, ", dilation ", g.dh, "x", g.dw, ")");
  g.C_out_total = total_out(g.blocks);
  if (grad_out != nullptr) {
    check_rank(*grad_out, "grad_out", {4});
    check_same(x, "x", *grad_out, "grad_out");
    TORCH_CHECK(grad_out->sizes() == at::IntArrayRef({g.N, g.C_out_total, g.Ho, g.Wo}), "grad_out must have shape [",
                g.N, ", ", g.C_out_total, ", ", g.Ho, ", ", g.Wo, "], got ", grad_out->sizes());
  }
  return g;
}

// Checks everything block_linear needs; returns the blocks.
inline std::vector<Block> check_block_linear(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, c10::IntArrayRef blocks,
                                             c10::IntArrayRef x_offsets, const at::Tensor* grad_out = nullptr) {
  check_rank(x, "x", {2});
  check_rank(weight, "weight", {2});
  check_same(x, "x", weight, "weight");
  check_floating(x, "x");
  check_bias(bias, x, weight.size(0));
  auto parsed = parse_blocks(blocks, weight.size(1), weight.size(0));
  check_x_offsets(parsed, x_offsets, x.size(1));
  if (grad_out != nullptr) {
    check_rank(*grad_out, "grad_out", {2});
    check_same(x, "x", *grad_out, "grad_out");
    TORCH_CHECK(grad_out->size(0) == x.size(0) && grad_out->size(1) == total_out(parsed), "grad_out must have shape [",
                x.size(0), ", ", total_out(parsed), "], got ", grad_out->sizes());
  }
  return parsed;
}

}  // namespace slimkern
