// Per-packed-channel bookkeeping shared by the depthwise engines of block_conv2d (the plane
// loops and planes in block_conv2d.cpp, the channels-last engine in block_conv2d_cl.cpp), and
// the image ranges of the engines that work image by image (channels last, gathered 1x1).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "slimkern/block_checks.h"
#include "slimkern/conv_math.h"

namespace slimkern::cpu {

// Images a parallel task takes: one range per thread (fewer when the batch is smaller), so
// each task allocates its scratch once.
inline int64_t images_per_task(int64_t N) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return std::max<int64_t>(1, (N + threads - 1) / threads);
}

// gb[b.out_start + j] += sum over images and pixels of go's packed channel pos_b + j, for
// every block b (the bias gradient of the GEMM engines; go contiguous).
inline void add_bias_grad(const at::Tensor& go, const ConvGeom& G, at::Tensor& gb) {
  const at::Tensor sums = go.sum({0, 2, 3});
  int64_t pos = 0;
  for (const auto& b : G.blocks) {
    gb.narrow(0, b.out_start, b.out_size()).add_(sums.narrow(0, pos, b.out_size()));
    pos += b.out_size();
  }
}

// Per packed output channel: the x channel it reads and its weight channel.
inline void channel_maps(const ConvGeom& G, c10::IntArrayRef offs, std::vector<int64_t>& oc_x,
                         std::vector<int64_t>& oc_w) {
  oc_x.resize(G.C_out_total);
  oc_w.resize(G.C_out_total);
  int64_t pos = 0;
  for (size_t b = 0; b < G.blocks.size(); ++b) {
    for (int64_t j = 0; j < G.blocks[b].in_size(); ++j) {
      oc_x[pos + j] = offs[b] + j;
      oc_w[pos + j] = G.blocks[b].in_start + j;
    }
    pos += G.blocks[b].in_size();
  }
}

// Depthwise taps of every packed output channel, read through the weight's strides.
template <typename T>
std::vector<T> gather_taps(const at::Tensor& weight, const std::vector<int64_t>& oc_w, int64_t KH, int64_t KW) {
  std::vector<T> taps(oc_w.size() * KH * KW);
  const T* wp = weight.data_ptr<T>();
  for (size_t oc = 0; oc < oc_w.size(); ++oc)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw)
        taps[(oc * KH + kh) * KW + kw] = wp[oc_w[oc] * weight.stride(0) + kh * weight.stride(2) + kw * weight.stride(3)];
  return taps;
}

// CSR lists: for each key in [0, n_keys), the packed output channels mapped to it.
inline void invert(const std::vector<int64_t>& oc_key, int64_t n_keys, std::vector<int64_t>& start,
                   std::vector<int64_t>& list) {
  start.assign(n_keys + 1, 0);
  for (auto k : oc_key) start[k + 1]++;
  for (int64_t k = 0; k < n_keys; ++k) start[k + 1] += start[k];
  list.resize(oc_key.size());
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (size_t oc = 0; oc < oc_key.size(); ++oc) list[fill[oc_key[oc]]++] = static_cast<int64_t>(oc);
}

// The valid (output pixel, input pixel, tap) terms of a depthwise geometry, for the engines
// that walk a list of them (channels last); sxh is the input's row stride.
struct Term {
  int64_t o, i, t;  // output pixel (contiguous plane), input pixel (x plane, row stride sxh), tap
};

inline std::vector<Term> terms_of(const ConvGeom& G, int64_t sxh) {
  std::vector<Term> terms;
  for (int64_t oh = 0; oh < G.Ho; ++oh)
    for (int64_t ow = 0; ow < G.Wo; ++ow)
      for (int64_t kh = 0; kh < G.KH; ++kh) {
        const int64_t ih = conv_in_index(oh, kh, G.sh, G.ph, G.dh);
        if (ih < 0 || ih >= G.H) continue;
        for (int64_t kw = 0; kw < G.KW; ++kw) {
          const int64_t iw = conv_in_index(ow, kw, G.sw, G.pw, G.dw);
          if (iw >= 0 && iw < G.W) terms.push_back({oh * G.Wo + ow, ih * sxh + iw, kh * G.KW + kw});
        }
      }
  return terms;
}

}  // namespace slimkern::cpu
