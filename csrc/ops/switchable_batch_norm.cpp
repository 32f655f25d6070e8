// Schemas of switchable batch norm (slimkern.ops.switchable_batch_norm).
//
// The forward and backward ops are functional so they can carry an autograd formula
// (torch.library.register_autograd refuses mutating ops); the in-place running-statistics
// update is its own small op. Block ranges cross as a flat int[] (G*2) and stat rows as
// int[] (G) so the fake kernels know every output shape without reading a tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  // -> (y, save_mean, save_var): y = act(w * (x - mean) / sqrt(var + eps) + b) per packed
  // channel; mean/var are the batch statistics (training) or the stat rows (eval), both
  // biased, [C_packed], float32 for half/bfloat16 x.
  m.def(
      "switchable_batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, int[] blocks, int[] stat_rows, bool training, float eps, str activation) "
      "-> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight [C_full], grad_bias [C_full]); the affine grads sum over blocks.
  m.def(
      "switchable_batch_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_var, int[] blocks, int num_channels, bool training, float eps, "
      "str activation) -> (Tensor, Tensor, Tensor)");
  // In place: rows stat_rows[g] of running_mean/var (channels of block g) move towards the
  // batch statistics; num_batches_tracked[row] += 1 once per row used; momentum=None uses
  // the cumulative average 1 / num_batches_tracked[row].
  m.def(
      "switchable_batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor save_mean, Tensor save_var, int[] blocks, "
      "int[] stat_rows, int count, float? momentum) -> ()");
}
