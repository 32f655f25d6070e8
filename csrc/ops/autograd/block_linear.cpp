// Autograd of slimkern::block_linear, in C++: backward is the slimkern::block_linear_backward
// op, as for block_conv2d (see block_conv2d.cpp here for why not torch.library's
// register_autograd: its Python Function costs more per call than a classifier's GEMMs).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "block_grads.h"

namespace slimkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
                             c10::IntArrayRef);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, c10::IntArrayRef,
                                                                  c10::IntArrayRef, std::array<bool, 3>);

class BlockLinearFunction : public torch::autograd::Function<BlockLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::IntArrayRef blocks,
                            c10::IntArrayRef x_offsets) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("slimkern::block_linear", "").typed<ForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(x, weight, bias, blocks, x_offsets);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["blocks"] = blocks.vec();
    ctx->saved_data["x_offsets"] = x_offsets.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("slimkern::block_linear_backward", "")
                               .typed<BackwardFn>();
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = block_grad_mask(ctx);
    return block_grads(5, mask, op.call(grad_outputs[0], saved[0], saved[1], ctx->saved_data["blocks"].toIntVector(),
                                        ctx->saved_data["x_offsets"].toIntVector(), mask));
  }
};

at::Tensor block_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 c10::IntArrayRef blocks, c10::IntArrayRef x_offsets) {
  return BlockLinearFunction::apply(x, weight, bias, blocks, x_offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, Autograd, m) { m.impl("block_linear", &block_linear_autograd); }

}  // namespace slimkern
