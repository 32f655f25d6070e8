// CUDA implementation of slimkern::block_linear and its backward.
//
// Each block is one GEMM handed to cuBLAS (through ATen's mm/addmm) on strided views:
// the weight slice weight[out_start:out_stop, in_start:in_stop] has unit column stride
// and leading dimension C_in, which cuBLAS takes as it is, so the parameter is never
// copied. The result of block g is written straight into its channel window of the
// packed output (addmm_/mm_out into a narrowed view); grad_x and grad_weight add into
// their windows in block order, which sums overlapping blocks and blocks that share
// input channels. cuBLAS accumulates half/bfloat16 products in float.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "slimkern/checks.h"

namespace slimkern {
namespace {

struct LinearProblem {
  std::vector<Block> blocks;
  std::vector<int64_t> y_offsets;
  int64_t y_channels;
};

LinearProblem check_linear(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef blocks_flat,
                           at::IntArrayRef x_offsets) {
  check_rank(x, "block_linear: x", {2});
  check_rank(weight, "block_linear: weight", {2});
  check_floating(x, "block_linear: x");
  check_same(x, "x", weight, "weight");
  TORCH_CHECK(x.is_cuda(), "block_linear (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "block_linear (CUDA kernel): unsupported dtype ", t);
  LinearProblem pb;
  pb.blocks = parse_blocks(blocks_flat, weight.size(1), weight.size(0));
  check_x_offsets(pb.blocks, x_offsets, x.size(1));
  int64_t off = 0;
  for (const Block& b : pb.blocks) {
    pb.y_offsets.push_back(off);
    off += b.out_size();
  }
  pb.y_channels = off;
  return pb;
}

at::Tensor weight_slice(const at::Tensor& w, const Block& b) {
  return w.narrow(0, b.out_start, b.out_size()).narrow(1, b.in_start, b.in_size());
}

at::Tensor block_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef blocks, at::IntArrayRef x_offsets) {
  LinearProblem pb = check_linear(x, weight, blocks, x_offsets);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_rank(*bias, "block_linear: bias", {1});
    check_same(x, "x", *bias, "bias");
    TORCH_CHECK(bias->size(0) == weight.size(0), "block_linear: bias has ", bias->size(0),
                " entries but the weight has ", weight.size(0), " output channels");
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), pb.y_channels}, x.options());
  if (y.numel() == 0) return y;
  for (size_t g = 0; g < pb.blocks.size(); ++g) {
    const Block& b = pb.blocks[g];
    at::Tensor y_g = y.narrow(1, pb.y_offsets[g], b.out_size());
    at::Tensor x_g = x.narrow(1, x_offsets[g], b.in_size());
    at::Tensor w_t = weight_slice(weight, b).t();
    if (has_bias) {
      at::addmm_out(y_g, bias->narrow(0, b.out_start, b.out_size()), x_g, w_t);
    } else {
      at::mm_out(y_g, x_g, w_t);
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_linear_backward_cuda(const at::Tensor& grad_out,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          at::IntArrayRef blocks,
                                                                          at::IntArrayRef x_offsets,
                                                                          std::array<bool, 3> output_mask) {
  LinearProblem pb = check_linear(x, weight, blocks, x_offsets);
  check_rank(grad_out, "block_linear_backward: grad_out", {2});
  check_same(x, "x", grad_out, "grad_out");
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == pb.y_channels,
              "block_linear_backward: grad_out has shape ", grad_out.sizes(), " but the forward output has shape [",
              x.size(0), ", ", pb.y_channels, "]");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = output_mask[0] ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gb = output_mask[2] ? at::zeros({weight.size(0)}, x.options()) : at::empty({0}, x.options());
  if (grad_out.numel() == 0) return {gx, gw, gb};
  for (size_t g = 0; g < pb.blocks.size(); ++g) {
    const Block& b = pb.blocks[g];
    at::Tensor go_g = grad_out.narrow(1, pb.y_offsets[g], b.out_size());
    if (output_mask[0]) {
      gx.narrow(1, x_offsets[g], b.in_size()).addmm_(go_g, weight_slice(weight, b));
    }
    if (output_mask[1]) {
      weight_slice(gw, b).addmm_(go_g.t(), x.narrow(1, x_offsets[g], b.in_size()));
    }
    if (output_mask[2]) {
      gb.narrow(0, b.out_start, b.out_size()).add_(go_g.sum(0));
    }
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CUDA, m) {
  m.impl("block_linear", &block_linear_cuda);
  m.impl("block_linear_backward", &block_linear_backward_cuda);
}

}  // namespace slimkern
