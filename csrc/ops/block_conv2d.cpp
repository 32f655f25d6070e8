// Schema of slimkern::block_conv2d: one conv per block of a block table, on slices of a
// shared weight, outputs packed along channels. Kernels: ops/cpu/, ops/cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def(
      "block_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] blocks, int[] x_offsets, int[] stride, "
      "int[] padding, int[] dilation, bool depthwise) -> Tensor");
  m.def(
      "block_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[] blocks, int[] x_offsets, "
      "int[] stride, int[] padding, int[] dilation, bool depthwise, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
