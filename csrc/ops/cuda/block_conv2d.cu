// CUDA kernels of slimkern::block_conv2d and its backward.
//
// Every block g is one launch on the current stream, reading the weight slice
// weight[out_start:out_stop, in_start:in_stop] in place through the weight's strides
// (the module parameter is never copied) and x/grad_out through their strides
// (non-contiguous and channels-last inputs need no copy either).
//   forward   one thread per output element (direct convolution); a warp shares
//             (n, co, oh), so weight reads are broadcasts and x reads run along ow.
//   grad_x    one thread per input element of the block's window (the transposed
//             direct convolution), added into an accumulator-dtype buffer; blocks
//             that share input channels (all-zero x_offsets) add in launch order.
//   grad_w    one thread block per weight element, reducing over N*Ho*Wo; blocks that
//             overlap in weight space add in launch order (the sum over blocks).
//   grad_bias the per-channel sum of grad_out, accumulated with ATen reductions.
// Accumulation is in at::opmath_type (float for half/bfloat16/float, double for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "slimkern/checks.h"
#include "slimkern/conv_math.h"

namespace slimkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride loops cover the rest

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Convolution geometry shared by all blocks of one call.
struct Geom {
  int64_t N, H, W, Ho, Wo;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
};

// One block: its weight ranges and where its input / output channels live in x / y.
struct BlockArgs {
  int64_t in_start, in_size, out_start, out_size, x_off, y_off;
};

// Input coordinate read by output coordinate o through tap k; -1 when it falls in the padding.
__device__ __forceinline__ int64_t input_index(int64_t o, int64_t k, int64_t s, int64_t p, int64_t d,
                                               int64_t extent) {
  const int64_t i = conv_in_index(o, k, s, p, d);
  return (i >= 0 && i < extent) ? i : -1;
}

int grid_for(int64_t work, int64_t per_block) {
  return static_cast<int>(std::min<int64_t>((work + per_block - 1) / per_block, kMaxGrid));
}

template <typename scalar_t>
__global__ void block_conv_fwd_kernel(const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ w,
                                      Strides4 ws, const scalar_t* __restrict__ bias, int64_t bias_stride,
                                      scalar_t* __restrict__ y, int64_t y_channels, Geom g, BlockArgs b,
                                      bool depthwise) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = g.N * b.out_size * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ow = i % g.Wo;
    int64_t t = i / g.Wo;
    const int64_t oh = t % g.Ho;
    t /= g.Ho;
    const int64_t co = t % b.out_size;
    const int64_t n = t / b.out_size;
    acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[(b.out_start + co) * bias_stride]) : acc_t(0);
    // Depthwise: output channel co reads only its own input channel and filter column 0.
    const int64_t channels = depthwise ? 1 : b.in_size;
    const scalar_t* x_c = x + n * xs.s0 + (b.x_off + (depthwise ? co : 0)) * xs.s1;
    const scalar_t* w_c = w + (b.out_start + co) * ws.s0 + (depthwise ? 0 : b.in_start) * ws.s1;
    // Taps outside, channels inside: the padding test runs once per tap, not per channel.
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = input_index(oh, kh, g.sh, g.ph, g.dh, g.H);
      if (ih < 0) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = input_index(ow, kw, g.sw, g.pw, g.dw, g.W);
        if (iw < 0) continue;
        const scalar_t* x_p = x_c + ih * xs.s2 + iw * xs.s3;
        const scalar_t* w_p = w_c + kh * ws.s2 + kw * ws.s3;
        for (int64_t ci = 0; ci < channels; ++ci) {
          acc += static_cast<acc_t>(x_p[ci * xs.s1]) * static_cast<acc_t>(w_p[ci * ws.s1]);
        }
      }
    }
    y[((n * y_channels + b.y_off + co) * g.Ho + oh) * g.Wo + ow] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void block_conv_grad_x_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ w,
                                         Strides4 ws, acc_t* __restrict__ gx, int64_t x_channels, Geom g,
                                         BlockArgs b, bool depthwise) {
  const int64_t total = g.N * b.in_size * g.H * g.W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t iw = i % g.W;
    int64_t t = i / g.W;
    const int64_t ih = t % g.H;
    t /= g.H;
    const int64_t ci = t % b.in_size;
    const int64_t n = t / b.in_size;
    const int64_t co_lo = depthwise ? ci : 0, co_hi = depthwise ? ci + 1 : b.out_size;
    const int64_t w_col = (depthwise ? 0 : b.in_start + ci) * ws.s1;
    const scalar_t* go_n = go + n * gs.s0;
    acc_t acc = 0;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t oh = conv_out_index(ih, kh, g.sh, g.ph, g.dh, g.Ho);
      if (oh < 0) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t ow = conv_out_index(iw, kw, g.sw, g.pw, g.dw, g.Wo);
        if (ow < 0) continue;
        const scalar_t* go_p = go_n + oh * gs.s2 + ow * gs.s3;
        const scalar_t* w_p = w + w_col + kh * ws.s2 + kw * ws.s3;
        for (int64_t co = co_lo; co < co_hi; ++co) {
          acc += static_cast<acc_t>(go_p[(b.y_off + co) * gs.s1]) *
                 static_cast<acc_t>(w_p[(b.out_start + co) * ws.s0]);
        }
      }
    }
    gx[((n * x_channels + b.x_off + ci) * g.H + ih) * g.W + iw] += acc;
  }
}

// Sum over the threads of a block, returned in thread 0. blockDim.x is a multiple of 32 (<= 1024).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ double raw[32];  // double: aligned for either accumulator type
  acc_t* partial = reinterpret_cast<acc_t*>(raw);
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = threadIdx.x < warps ? partial[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();  // partial may be reused by the next call
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void block_conv_grad_w_kernel(const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ x,
                                         Strides4 xs, acc_t* __restrict__ gw, Strides4 gws, Geom g, BlockArgs b,
                                         bool depthwise) {
  const int64_t cin = depthwise ? 1 : b.in_size;
  const int64_t elems = b.out_size * cin * g.KH * g.KW;
  const int64_t positions = g.N * g.Ho * g.Wo;
  for (int64_t e = blockIdx.x; e < elems; e += gridDim.x) {
    const int64_t kw = e % g.KW;
    int64_t t = e / g.KW;
    const int64_t kh = t % g.KH;
    t /= g.KH;
    const int64_t ci = t % cin;
    const int64_t co = t / cin;
    const scalar_t* go_c = go + (b.y_off + co) * gs.s1;
    const scalar_t* x_c = x + (b.x_off + (depthwise ? co : ci)) * xs.s1;
    acc_t acc = 0;
    for (int64_t p = threadIdx.x; p < positions; p += blockDim.x) {
      const int64_t ow = p % g.Wo;
      const int64_t q = p / g.Wo;
      const int64_t oh = q % g.Ho;
      const int64_t n = q / g.Ho;
      const int64_t ih = input_index(oh, kh, g.sh, g.ph, g.dh, g.H);
      const int64_t iw = input_index(ow, kw, g.sw, g.pw, g.dw, g.W);
      if (ih < 0 || iw < 0) continue;
      acc += static_cast<acc_t>(go_c[n * gs.s0 + oh * gs.s2 + ow * gs.s3]) *
             static_cast<acc_t>(x_c[n * xs.s0 + ih * xs.s2 + iw * xs.s3]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
      gw[(b.out_start + co) * gws.s0 + (depthwise ? 0 : b.in_start + ci) * gws.s1 + kh * gws.s2 + kw * gws.s3] += acc;
    }
  }
}

std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "block_conv2d: ", name, " must have 1 or 2 entries, got ", v.size());
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

struct ConvProblem {
  std::vector<Block> blocks;
  std::vector<BlockArgs> args;
  Geom geom;
  int64_t y_channels;
};

// Validates everything the forward and backward share, before any kernel runs.
ConvProblem check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef blocks_flat,
                       at::IntArrayRef x_offsets, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool depthwise) {
  check_rank(x, "block_conv2d: x", {4});
  check_rank(weight, "block_conv2d: weight", {4});
  check_floating(x, "block_conv2d: x");
  check_same(x, "x", weight, "weight");
  TORCH_CHECK(x.is_cuda(), "block_conv2d (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  if (depthwise) {
    TORCH_CHECK(weight.size(1) == 1, "block_conv2d: a depthwise weight must have shape [C, 1, kh, kw], got ",
                weight.sizes());
  }
  ConvProblem pb;
  pb.blocks = parse_blocks(blocks_flat, depthwise ? weight.size(0) : weight.size(1), weight.size(0));
  if (depthwise) {
    for (size_t g = 0; g < pb.blocks.size(); ++g) {
      const Block& bl = pb.blocks[g];
      TORCH_CHECK(bl.in_start == bl.out_start && bl.in_stop == bl.out_stop, "block_conv2d: depthwise block ", g,
                  " must have equal input and output ranges, got in [", bl.in_start, ", ", bl.in_stop, ") and out [",
                  bl.out_start, ", ", bl.out_stop, ")");
    }
  }
  check_x_offsets(pb.blocks, x_offsets, x.size(1));
  const auto s = pair_arg(stride, "stride"), p = pair_arg(padding, "padding"), d = pair_arg(dilation, "dilation");
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "block_conv2d: stride must be positive, got ", stride);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0, "block_conv2d: padding must be non-negative, got ", padding);
  TORCH_CHECK(d[0] > 0 && d[1] > 0, "block_conv2d: dilation must be positive, got ", dilation);
  Geom& g = pb.geom;
  g.N = x.size(0);
  g.H = x.size(2);
  g.W = x.size(3);
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.sh = s[0];
  g.sw = s[1];
  g.ph = p[0];
  g.pw = p[1];
  g.dh = d[0];
  g.dw = d[1];
  const int64_t span_h = d[0] * (g.KH - 1) + 1, span_w = d[1] * (g.KW - 1) + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= span_h && g.W + 2 * g.pw >= span_w, "block_conv2d: the padded input (",
              g.H + 2 * g.ph, " x ", g.W + 2 * g.pw, ") is smaller than the dilated kernel (", span_h, " x ", span_w,
              ")");
  g.Ho = conv_out_size(g.H, g.KH, g.sh, g.ph, g.dh);
  g.Wo = conv_out_size(g.W, g.KW, g.sw, g.pw, g.dw);
  int64_t y_off = 0;
  for (size_t i = 0; i < pb.blocks.size(); ++i) {
    const Block& bl = pb.blocks[i];
    pb.args.push_back({bl.in_start, bl.in_size(), bl.out_start, bl.out_size(), x_offsets[i], y_off});
    y_off += bl.out_size();
  }
  pb.y_channels = y_off;
  return pb;
}

at::Tensor block_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef blocks, at::IntArrayRef x_offsets, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise) {
  ConvProblem pb = check_conv(x, weight, blocks, x_offsets, stride, padding, dilation, depthwise);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_rank(*bias, "block_conv2d: bias", {1});
    check_same(x, "x", *bias, "bias");
    TORCH_CHECK(bias->size(0) == weight.size(0), "block_conv2d: bias has ", bias->size(0),
                " entries but the weight has ", weight.size(0), " output channels");
  }
  const Geom& g = pb.geom;
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({g.N, pb.y_channels, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_conv2d_cuda", [&] {
    const scalar_t* bias_ptr = has_bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int64_t bias_stride = has_bias ? bias->stride(0) : 0;
    for (const BlockArgs& b : pb.args) {
      const int64_t total = g.N * b.out_size * g.Ho * g.Wo;
      block_conv_fwd_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(), strides_of(weight),
          bias_ptr, bias_stride, y.mutable_data_ptr<scalar_t>(), pb.y_channels, g, b, depthwise);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef blocks,
    at::IntArrayRef x_offsets, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, std::array<bool, 3> output_mask) {
  ConvProblem pb = check_conv(x, weight, blocks, x_offsets, stride, padding, dilation, depthwise);
  const Geom& g = pb.geom;
  check_rank(grad_out, "block_conv2d_backward: grad_out", {4});
  check_same(x, "x", grad_out, "grad_out");
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == pb.y_channels && grad_out.size(2) == g.Ho &&
                  grad_out.size(3) == g.Wo,
              "block_conv2d_backward: grad_out has shape ", grad_out.sizes(), " but the forward output has shape [",
              g.N, ", ", pb.y_channels, ", ", g.Ho, ", ", g.Wo, "]");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc_dtype);
  at::Tensor gx = output_mask[0] ? at::zeros(x.sizes(), acc_opts) : at::empty({0}, x.options());
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), acc_opts) : at::empty({0}, x.options());
  at::Tensor gb = output_mask[2] ? at::zeros({weight.size(0)}, acc_opts) : at::empty({0}, x.options());
  const bool work = grad_out.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const BlockArgs& b : pb.args) {
      if (!work) break;
      if (output_mask[0]) {
        const int64_t total = g.N * b.in_size * g.H * g.W;
        block_conv_grad_x_kernel<scalar_t, acc_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), strides_of(grad_out), weight.const_data_ptr<scalar_t>(),
            strides_of(weight), gx.mutable_data_ptr<acc_t>(), x.size(1), g, b, depthwise);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[1]) {
        const int64_t elems = b.out_size * (depthwise ? 1 : b.in_size) * g.KH * g.KW;
        // Few positions to reduce over: a smaller thread block leaves fewer threads idle.
        const int threads = g.N * g.Ho * g.Wo >= 4 * kThreads ? kThreads : 64;
        block_conv_grad_w_kernel<scalar_t, acc_t><<<grid_for(elems, 1), threads, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), strides_of(grad_out), x.const_data_ptr<scalar_t>(), strides_of(x),
            gw.mutable_data_ptr<acc_t>(), strides_of(gw), g, b, depthwise);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[2]) {
        gb.narrow(0, b.out_start, b.out_size)
            .add_(grad_out.narrow(1, b.y_off, b.out_size).sum({0, 2, 3}, /*keepdim=*/false, acc_dtype));
      }
    }
  });
  // Accumulated in opmath precision; hand back the inputs' dtype (a no-op for float/double).
  return {gx.to(x.scalar_type()), gw.to(x.scalar_type()), gb.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimkern, CUDA, m) {
  m.impl("block_conv2d", &block_conv2d_cuda);
  m.impl("block_conv2d_backward", &block_conv2d_backward_cuda);
}

}  // namespace slimkern
