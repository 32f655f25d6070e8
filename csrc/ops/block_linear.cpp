// Schema of slimkern::block_linear: one linear map per block of a block table, on slices
// of a shared weight, outputs packed along features. Kernels: ops/cpu/, ops/cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def("block_linear(Tensor x, Tensor weight, Tensor? bias, int[] blocks, int[] x_offsets) -> Tensor");
  m.def(
      "block_linear_backward(Tensor grad_out, Tensor x, Tensor weight, int[] blocks, int[] x_offsets, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
