// Switchable batch norm on CUDA: one thread block per packed channel for the reductions
// (Welford per thread, Chan-merged across the block), element-wise kernels for the fused
// normalise + affine + activation and for the input gradient. Half and bfloat16 x compute
// in float; the saved statistics are float for them (double for double x).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "slimkern/bn_checks.h"

namespace slimkern {
namespace {

using namespace bn;

constexpr int kThreads = 256;

// chan[0][p] = full channel, chan[1][p] = statistics row of packed channel p.
at::Tensor channel_table(const Layout& L, const at::Device& device) {
  std::vector<int64_t> flat(L.chan_full);
  if (L.chan_row.empty()) flat.insert(flat.end(), L.Cp, 0);
  else flat.insert(flat.end(), L.chan_row.begin(), L.chan_row.end());
  return at::tensor(flat, at::TensorOptions().dtype(at::kLong)).view({2, L.Cp}).to(device);
}

template <typename acc_t>
__device__ Welford<acc_t> block_welford(Welford<acc_t> w) {
  __shared__ acc_t sn[kThreads], sm[kThreads], s2[kThreads];
  const int t = threadIdx.x;
  sn[t] = w.n;
  sm[t] = w.mean;
  s2[t] = w.m2;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      const Welford<acc_t> r = welford_combine(Welford<acc_t>{sn[t], sm[t], s2[t]},
                                               Welford<acc_t>{sn[t + stride], sm[t + stride], s2[t + stride]});
      sn[t] = r.n;
      sm[t] = r.mean;
      s2[t] = r.m2;
    }
    __syncthreads();
  }
  return Welford<acc_t>{sn[0], sm[0], s2[0]};
}

template <typename acc_t>
__device__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sa[kThreads], sb[kThreads];
  const int t = threadIdx.x;
  sa[t] = a;
  sb[t] = b;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      sa[t] += sa[t + stride];
      sb[t] += sb[t + stride];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

struct Strides {
  int64_t w, b, rm0, rm1, rv0, rv1;
};

// Per packed channel: statistics (batch or stat row), then the folded affine (scale, shift).
template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ x, const scalar_t* w, const scalar_t* b,
                             const scalar_t* rm, const scalar_t* rv, const int64_t* chan, int64_t N, int64_t Cp,
                             int64_t HW, bool training, acc_t eps, Strides st, acc_t* save_mean, acc_t* save_var,
                             acc_t* scale, acc_t* shift) {
  const int64_t p = blockIdx.x;
  const int64_t c = chan[p], r = chan[Cp + p];
  acc_t mean, var;
  if (training) {
    Welford<acc_t> acc{acc_t(0), acc_t(0), acc_t(0)};
    const int64_t M = N * HW;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
      const int64_t n = i / HW, hw = i - n * HW;
      acc = welford_push(acc, static_cast<acc_t>(x[(n * Cp + p) * HW + hw]));
    }
    acc = block_welford(acc);
    mean = acc.mean;
    var = acc.m2 / acc.n;
  } else {
    mean = static_cast<acc_t>(rm[r * st.rm0 + c * st.rm1]);
    var = static_cast<acc_t>(rv[r * st.rv0 + c * st.rv1]);
  }
  if (threadIdx.x == 0) {
    const acc_t wv = w ? static_cast<acc_t>(w[c * st.w]) : acc_t(1);
    const acc_t bv = b ? static_cast<acc_t>(b[c * st.b]) : acc_t(0);
    acc_t sc, sh;
    fold_affine(mean, invstd(var, eps), &wv, &bv, sc, sh);
    save_mean[p] = mean;
    save_var[p] = var;
    scale[p] = sc;
    shift[p] = sh;
  }
}

template <int ACT, typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const acc_t* scale,
                             const acc_t* shift, int64_t total, int64_t Cp, int64_t HW) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = (i / HW) % Cp;
    y[i] = static_cast<scalar_t>(activate<ACT>(static_cast<acc_t>(x[i]) * scale[p] + shift[p]));
  }
}

// Per packed channel: sums of g and g (x - mean) (g = dy masked by the activation), the
// affine gradients and the coefficients of dx = scale g + k1 (x - mean) + k0.
template <int ACT, typename scalar_t, typename acc_t>
__global__ void grad_reduce_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const scalar_t* w, const acc_t* save_mean, const acc_t* save_var,
                                   const int64_t* chan, int64_t N, int64_t Cp, int64_t HW, bool training, acc_t eps,
                                   int64_t wst, const scalar_t* b, int64_t bst, acc_t* gw, acc_t* gb, acc_t* coef) {
  const int64_t p = blockIdx.x;
  const int64_t c = chan[p];
  const acc_t mean = save_mean[p], inv = invstd(save_var[p], eps);
  const acc_t wv = w ? static_cast<acc_t>(w[c * wst]) : acc_t(1);
  const acc_t bv = b ? static_cast<acc_t>(b[c * bst]) : acc_t(0);
  acc_t scale, shift;
  fold_affine(mean, inv, &wv, &bv, scale, shift);
  acc_t sg = 0, sgx = 0;
  const int64_t M = N * HW;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t n = i / HW, hw = i - n * HW;
    const int64_t off = (n * Cp + p) * HW + hw;
    const acc_t xv = static_cast<acc_t>(x[off]);
    const acc_t g = mask_grad<ACT>(xv * scale + shift, static_cast<acc_t>(dy[off]));
    sg += g;
    sgx += g * (xv - mean);
  }
  block_sum2(sg, sgx);
  if (threadIdx.x == 0) {
    gw[p] = sgx * inv;
    gb[p] = sg;
    const acc_t m = static_cast<acc_t>(M);
    coef[4 * p + 0] = scale;
    coef[4 * p + 1] = shift;
    coef[4 * p + 2] = training ? -scale * inv * inv * sgx / m : acc_t(0);
    coef[4 * p + 3] = training ? -scale * sg / m : acc_t(0);
  }
}

template <int ACT, typename scalar_t, typename acc_t>
__global__ void grad_x_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ dx, const acc_t* save_mean, const acc_t* coef, int64_t total,
                              int64_t Cp, int64_t HW) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = (i / HW) % Cp;
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t scale = coef[4 * p], shift = coef[4 * p + 1];
    const acc_t g = mask_grad<ACT>(xv * scale + shift, static_cast<acc_t>(dy[i]));
    dx[i] = static_cast<scalar_t>(scale * g + coef[4 * p + 2] * (xv - save_mean[p]) + coef[4 * p + 3]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void update_kernel(scalar_t* rm, scalar_t* rv, const int64_t* nbt, int64_t nbt_stride, const acc_t* save_mean,
                              const acc_t* save_var, const int64_t* chan, int64_t Cp, Strides st, acc_t count,
                              bool has_momentum, acc_t momentum) {
  const int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= Cp) return;
  const int64_t c = chan[p], r = chan[Cp + p];
  const acc_t f = has_momentum ? momentum : acc_t(1) / static_cast<acc_t>(nbt[r * nbt_stride]);
  scalar_t& om = rm[r * st.rm0 + c * st.rm1];
  scalar_t& ov = rv[r * st.rv0 + c * st.rv1];
  om = static_cast<scalar_t>(running_update(static_cast<acc_t>(om), save_mean[p], f));
  ov = static_cast<scalar_t>(running_update(static_cast<acc_t>(ov), unbiased(save_var[p], count), f));
}

int elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535)));
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}
int64_t opt_stride(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->stride(0) : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, c10::IntArrayRef blocks,
    c10::IntArrayRef stat_rows, bool training, double eps, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Layout L = check_forward(x_in, weight, bias, running_mean, running_var, blocks, stat_rows, training);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor smean = at::empty({L.Cp}, sopt), svar = at::empty({L.Cp}, sopt);
  at::Tensor affine = at::empty({2, L.Cp}, sopt);
  const at::Tensor chan = channel_table(L, x.device());
  const Strides st{opt_stride(weight), opt_stride(bias), running_mean.stride(0), running_mean.stride(1),
                   running_var.stride(0), running_var.stride(1)};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switchable_batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sc = affine.data_ptr<acc_t>();
    stats_kernel<scalar_t, acc_t><<<L.Cp, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(weight), opt_ptr<scalar_t>(bias), running_mean.data_ptr<scalar_t>(),
        running_var.data_ptr<scalar_t>(), chan.data_ptr<int64_t>(), L.N, L.Cp, L.HW, training,
        static_cast<acc_t>(eps), st, smean.data_ptr<acc_t>(), svar.data_ptr<acc_t>(), sc, sc + L.Cp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = x.numel();
    if (total > 0) {
      dispatch_activation(act, [&](auto a) {
        apply_kernel<decltype(a)::value, scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sc, sc + L.Cp, total, L.Cp, L.HW);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, smean, svar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    c10::IntArrayRef blocks, int64_t num_channels, bool training, double eps, c10::string_view activation) {
  const int act = parse_activation(activation);
  const Layout L = check_backward(grad_y, x_in, weight, bias, save_mean, save_var, blocks, num_channels);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = grad_y.contiguous();
  const at::Tensor m = save_mean.contiguous(), v = save_var.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor gwp = at::empty({L.Cp}, sopt), gbp = at::empty({L.Cp}, sopt), coef = at::empty({L.Cp, 4}, sopt);
  const at::Tensor chan = channel_table(L, x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "switchable_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      grad_reduce_kernel<A, scalar_t, acc_t><<<L.Cp, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(weight), m.data_ptr<acc_t>(),
          v.data_ptr<acc_t>(), chan.data_ptr<int64_t>(), L.N, L.Cp, L.HW, training, static_cast<acc_t>(eps),
          opt_stride(weight), opt_ptr<scalar_t>(bias), opt_stride(bias), gwp.data_ptr<acc_t>(),
          gbp.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t total = x.numel();
      if (total > 0) {
        grad_x_kernel<A, scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
            dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), m.data_ptr<acc_t>(),
            coef.data_ptr<acc_t>(), total, L.Cp, L.HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  // Shared affine parameters: a channel's gradient sums over every block that uses it.
  const at::Tensor full = chan[0];
  at::Tensor gw = at::zeros({L.C}, sopt).index_add_(0, full, gwp).to(x.scalar_type());
  at::Tensor gb = at::zeros({L.C}, sopt).index_add_(0, full, gbp).to(x.scalar_type());
  return {dx, gw, gb};
}

void update_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                       const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& save_mean,
                       const at::Tensor& save_var, c10::IntArrayRef blocks, c10::IntArrayRef stat_rows, int64_t count,
                       c10::optional<double> momentum) {
  check_floating(running_mean, "running_mean");
  const Layout L = check_update_stats(running_mean, running_var, num_batches_tracked, save_mean, save_var, blocks,
                                      stat_rows, count, momentum);
  c10::cuda::CUDAGuard guard(running_mean.device());
  const at::Tensor chan = channel_table(L, running_mean.device());
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  // Every check has passed: from here on the buffers are written.
  if (has_nbt) {
    std::vector<int64_t> used;
    for (int64_t r : L.rows)
      if (std::find(used.begin(), used.end(), r) == used.end()) used.push_back(r);
    const at::Tensor idx = at::tensor(used, at::TensorOptions().dtype(at::kLong)).to(running_mean.device());
    num_batches_tracked->index_add_(0, idx, at::ones_like(idx));
  }
  const Strides st{0, 0, running_mean.stride(0), running_mean.stride(1), running_var.stride(0), running_var.stride(1)};
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor m = save_mean.contiguous(), v = save_var.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "switchable_batch_norm_update_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    update_kernel<scalar_t, acc_t><<<(L.Cp + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
        has_nbt ? num_batches_tracked->data_ptr<int64_t>() : nullptr, has_nbt ? num_batches_tracked->stride(0) : 0,
        m.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
        chan.data_ptr<int64_t>(), L.Cp, st, static_cast<acc_t>(count), momentum.has_value(),
        static_cast<acc_t>(momentum.value_or(0.0)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CUDA, m) {
  m.impl("switchable_batch_norm", &forward_cuda);
  m.impl("switchable_batch_norm_backward", &backward_cuda);
  m.impl("switchable_batch_norm_update_stats_", &update_stats_cuda);
}

}  // namespace slimkern
