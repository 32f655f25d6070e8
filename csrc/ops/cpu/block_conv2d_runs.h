// block_conv2d through ATen's convolution (oneDNN on CPU), one grouped call per *run* of blocks.
//
// A run is a maximal sequence of consecutive blocks that one grouped convolution computes
// exactly: their x windows follow one another, and they have equal (in, out) sizes, so block j
// of the run is group j of a conv with `groups = run length` on the weight slices stacked
// along the output dim. Depthwise blocks always merge (every channel is its own group), so a
// packed depthwise layer is ONE oneDNN call whatever its block table. ParaDiS tables
// (`[0.5, 0.5]`, `[4x0.25]`) become one call per distinct branch width instead of one per
// branch, with no slicing of x and, when a single run covers the layer, no output copy.
// Except where oneDNN's grouped convolution is the slower choice: dense blocks of few
// channels on large maps stay one call each (split_groups in the .cpp). On AVX-512, a dense
// one-group run whose channel counts are off oneDNN's block of 16 is convolved channels last
// and copied back to NCHW (channels_last_pays in the .cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "slimkern/block_checks.h"

namespace slimkern::cpu {

struct Run {
  size_t g0, g1;       // blocks [g0, g1)
  int64_t x0, cin;     // x channels [x0, x0 + cin)
  int64_t pos, cout;   // packed output channels [pos, pos + cout)
  int64_t groups;
};

std::vector<Run> make_runs(const ConvGeom& G, c10::IntArrayRef offs);

at::Tensor runs_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const ConvGeom& G, c10::IntArrayRef offs);

// gx is assigned (it may become the convolution's own gradient); gw / gb are zero-initialised
// full-size tensors that the blocks' gradients are added into.
void runs_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb);

// Writes per-block input gradients into an uninitialised gx: the first window to cover a
// channel overwrites it, later ones add (overlapping windows: shared inputs), and channels
// that no block reads are zeroed by finish(). Packed, non-overlapping windows never pay for
// zeroing.
class GradInputWriter {
 public:
  explicit GradInputWriter(at::Tensor gx) : gx_(std::move(gx)), written_(gx_.defined() ? gx_.size(1) : 0, 0) {}
  // Prepares channels [lo, lo + n); returns true when the window must be added into.
  bool begin(int64_t lo, int64_t n);
  void finish();

 private:
  void zero_unwritten(int64_t lo, int64_t hi);

  at::Tensor gx_;
  std::vector<char> written_;
};

}  // namespace slimkern::cpu
