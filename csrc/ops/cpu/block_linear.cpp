// CPU kernels of slimkern::block_linear and its backward: one GEMM per block on views
// (weight slice W[o0:o1, i0:i1] read through its strides, x's feature window, the output's
// feature window written in place), so nothing is sliced into a copy or concatenated.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "slimkern/block_checks.h"

namespace slimkern {
namespace {

at::Tensor w_slice(const at::Tensor& w, const Block& b) {
  return w.narrow(0, b.out_start, b.out_size()).narrow(1, b.in_start, b.in_size());
}

at::Tensor block_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef blocks, c10::IntArrayRef x_offsets) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops on views
  const auto parsed = check_block_linear(x, weight, bias, blocks, x_offsets);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor out = at::empty({x.size(0), total_out(parsed)}, x.options());
  if (x.size(0) == 0) return out;
  int64_t pos = 0;
  for (size_t g = 0; g < parsed.size(); ++g) {
    const auto& b = parsed[g];
    at::Tensor o = out.narrow(1, pos, b.out_size());
    at::Tensor xs = x.narrow(1, x_offsets[g], b.in_size());
    at::Tensor wt = w_slice(weight, b).t();
    if (has_bias)
      at::addmm_out(o, bias->narrow(0, b.out_start, b.out_size()), xs, wt);
    else
      at::mm_out(o, xs, wt);
    pos += b.out_size();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef blocks,
    c10::IntArrayRef x_offsets, std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops on views
  const auto parsed = check_block_linear(x, weight, std::nullopt, blocks, x_offsets, &grad_out);
  at::Tensor gx = mask[0] ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  at::Tensor gb = mask[2] ? at::zeros({weight.size(0)}, weight.options()) : at::empty({0}, weight.options());
  if (x.size(0) == 0) return {gx, gw, gb};
  int64_t pos = 0;
  for (size_t g = 0; g < parsed.size(); ++g) {
    const auto& b = parsed[g];
    at::Tensor go = grad_out.narrow(1, pos, b.out_size());
    at::Tensor xs = x.narrow(1, x_offsets[g], b.in_size());
    if (mask[0]) gx.narrow(1, x_offsets[g], b.in_size()).addmm_(go, w_slice(weight, b));
    if (mask[1]) w_slice(gw, b).addmm_(go.t(), xs);
    if (mask[2]) gb.narrow(0, b.out_start, b.out_size()).add_(go.sum(0));
    pos += b.out_size();
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CPU, m) {
  m.impl("block_linear", &block_linear_cpu);
  m.impl("block_linear_backward", &block_linear_backward_cpu);
}

}  // namespace slimkern
