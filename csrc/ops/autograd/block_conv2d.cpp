// Autograd of slimkern::block_conv2d, in C++: backward is the slimkern::block_conv2d_backward
// op (CPU / CUDA kernels), so gradients never leave the dispatcher. Registered here rather
// than with torch.library.register_autograd because the Python autograd.Function around
// every call cost 100-250 us per forward+backward (profiled at batch 64, 16 depthwise
// channels on 32x32 maps: a tenth of the whole op), which a C++ Function does not.
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
                             c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, bool, std::array<bool, 3>);

class BlockConv2dFunction : public torch::autograd::Function<BlockConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::IntArrayRef blocks, c10::IntArrayRef x_offsets,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            bool depthwise) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("slimkern::block_conv2d", "")
                               .typed<ForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["blocks"] = blocks.vec();
    ctx->saved_data["x_offsets"] = x_offsets.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["depthwise"] = depthwise;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("slimkern::block_conv2d_backward", "")
                               .typed<BackwardFn>();
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = block_grad_mask(ctx);
    const auto blocks = ctx->saved_data["blocks"].toIntVector();
    const auto x_offsets = ctx->saved_data["x_offsets"].toIntVector();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    return block_grads(9, mask, op.call(grad_outputs[0], saved[0], saved[1], blocks, x_offsets, stride, padding,
                                        dilation, ctx->saved_data["depthwise"].toBool(), mask));
  }
};

at::Tensor block_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 c10::IntArrayRef blocks, c10::IntArrayRef x_offsets, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation, bool depthwise) {
  return BlockConv2dFunction::apply(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, Autograd, m) { m.impl("block_conv2d", &block_conv2d_autograd); }

}  // namespace slimkern
