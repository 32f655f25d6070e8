// block_conv2d for 1x1 / stride 1 / no padding as per-image GEMMs on channel windows.
//
// Block g of image n is out_n[pos_g : pos_g + Co] = W_g @ x_n[off_g : off_g + Ci], a
// (Co x Ci) by (Ci x H*W) product read and written in place through the tensors' strides:
// nothing is sliced into a copy, nothing is concatenated. One parallel region per call splits
// the batch (and, for batches smaller than the thread count, each image's pixels) across
// threads, and every thread runs a single-threaded GEMM per (image, block): float32 on AVX2 and
// AVX-512 processors our own kernel (sgemm.h), otherwise the BLAS. No parallel region per
// GEMM, whose start-up and barriers cost more than the GEMM itself at these sizes (and made
// MKL's batched GEMM 3-7x slower under OMP_WAIT_POLICY=PASSIVE). The weight gradient sums
// per-thread partial sums, so overlapping blocks never race.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "slimkern/block_checks.h"

namespace slimkern::cpu {

// True when the BLAS this torch build links exports sgemm_/dgemm_ (MKL and OpenBLAS do);
// without it (and without AVX-512 for float32) callers take the oneDNN path.
bool have_blas_gemm();

at::Tensor pointwise_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const ConvGeom& G, c10::IntArrayRef offs);

// gx is uninitialised on entry; gw / gb are zero-initialised full-size tensors.
void pointwise_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                        c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw,
                        at::Tensor& gb);

}  // namespace slimkern::cpu
