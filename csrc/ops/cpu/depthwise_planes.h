// Stride-1 depthwise planes (float32), for block_conv2d's depthwise engine: one kernel source
// (depthwise_planes_kernel.h) over a small vector interface, compiled for AVX-512 (16 lanes,
// mask registers) and for AVX2+FMA (8 lanes, vmaskmov), and run for the CPU capability in use
// (slimkern/cpu_capability.h; SLIMKERN_CPU_CAPABILITY forces the narrower one).
//
// Why our own: oneDNN's depthwise convolution on NCHW tensors (what ATen hands it) runs
// ~9x slower than copying the same bytes on the CI machine (470 us for a 64 x 16 x 32 x 32
// layer whose 4 MiB copy takes 54 us); the planes here stay in L1 while each output vector
// takes one masked load and one FMA per tap. No ATen here: the ISA files compile under a
// target pragma, and ATen's inline functions must not be compiled for AVX-512 there.
//
// One routine serves the forward pass and the input gradient: both are correlations
//   out[r][c] = (accumulate ? out[r][c] : 0) + bias + sum_{kh,kw} w[kh][kw] * in[r + roff[kh]][c + coff[kw]]
// with `in` read as zero outside [0, Hin) x [0, Win): forward with roff = kh*dh - ph,
// coff = kw*dw - pw; input gradient (in = grad_out) with roff = ph - kh*dh, coff = pw - kw*dw.
#pragma once

#include <cstdint>

namespace slimkern::cpu {

constexpr int64_t kDwMaxTaps = 16;     // per axis
constexpr int64_t kDwMaxVectors = 16;  // 16-column groups per output row: rows up to 256 wide

// True when the capability in use has a build of the planes (AVX2 or AVX-512).
bool have_depthwise_planes();

struct DwPlane {
  int64_t Hin, Win, ld_in;  // input plane: rows ld_in apart, unit column stride
  int64_t Hout, Wout;       // output plane: contiguous
  int64_t KH, KW;           // at most kDwMaxTaps each; Wout at most 16 * kDwMaxVectors
  const int64_t* roff;      // KH row offsets
  const int64_t* coff;      // KW column offsets
  // masks[v * KW + kw]: bit i set when column 16v + i exists (< Wout) and reads a column
  // inside [0, Win) at tap kw; set by dw_column_masks, once per call, not per plane.
  uint16_t masks[kDwMaxVectors * kDwMaxTaps];
};

void dw_column_masks(DwPlane& g);

// Only call when have_depthwise_planes().
void dw_correlate(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g);

// gw[kh * KW + kw] += sum_{r,c} go[r][c] * in[r + roff[kh]][c + coff[kw]] and *gb += sum go,
// over one output plane `go` (Hout x Wout, contiguous) and its input plane (the forward's x).
// Only call when have_depthwise_planes().
void dw_weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb);

}  // namespace slimkern::cpu
