// What the C++ autograd Functions of the block ops (x, weight, bias, then non-tensor
// arguments) share: which of the three gradients backward must compute, and the gradient
// list autograd expects (one entry per forward input).
#pragma once

#include <torch/autograd.h>

#include <array>
#include <tuple>

namespace slimkern {

// forward stored ctx->saved_data["has_bias"]; a None bias needs no gradient.
inline std::array<bool, 3> block_grad_mask(torch::autograd::AutogradContext* ctx) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
}

inline torch::autograd::variable_list block_grads(size_t n_inputs, const std::array<bool, 3>& mask,
                                                  const std::tuple<at::Tensor, at::Tensor, at::Tensor>& g) {
  torch::autograd::variable_list grads(n_inputs);  // non-tensor inputs get none
  if (mask[0]) grads[0] = std::get<0>(g);
  if (mask[1]) grads[1] = std::get<1>(g);
  if (mask[2]) grads[2] = std::get<2>(g);
  return grads;
}

}  // namespace slimkern
