// Runs of blocks on ATen's convolution: see block_conv2d_runs.h.
#include "block_conv2d_runs.h"

#include <algorithm>

#include "slimkern/cpu_capability.h"

namespace slimkern::cpu {
namespace {

at::Tensor block_weight(const at::Tensor& w, const Block& b, bool depthwise) {
  at::Tensor s = w.narrow(0, b.out_start, b.out_size());
  return depthwise ? s : s.narrow(1, b.in_start, b.in_size());
}

// True when the run's blocks read consecutive weight rows (output channels), so their rows
// stacked are a slice of the parameter.
bool rows_follow(const ConvGeom& G, const Run& r) {
  for (size_t g = r.g0 + 1; g < r.g1; ++g)
    if (G.blocks[g].out_start != G.blocks[g - 1].out_stop) return false;
  return true;
}

// The run's weight: its blocks' slices stacked along the output dim (the grouped conv's
// weight). A view when the rows follow one another and (unless depthwise) every block reads
// the same input columns; otherwise a copy, a few KB to MB against activations of N*C*H*W.
at::Tensor run_weight(const at::Tensor& w, const ConvGeom& G, const Run& r) {
  const Block& first = G.blocks[r.g0];
  bool view = rows_follow(G, r);
  for (size_t g = r.g0 + 1; g < r.g1 && view && !G.depthwise; ++g)
    view = G.blocks[g].in_start == first.in_start && G.blocks[g].in_stop == first.in_stop;
  if (view) return block_weight(w, Block{first.in_start, first.in_stop, first.out_start, first.out_start + r.cout},
                                G.depthwise);
  std::vector<at::Tensor> parts;
  for (size_t g = r.g0; g < r.g1; ++g) parts.push_back(block_weight(w, G.blocks[g], G.depthwise));
  return at::cat(parts, 0);
}

std::optional<at::Tensor> run_bias(const std::optional<at::Tensor>& bias, const ConvGeom& G, const Run& r) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  if (rows_follow(G, r)) return bias->narrow(0, G.blocks[r.g0].out_start, r.cout);
  std::vector<at::Tensor> parts;
  for (size_t g = r.g0; g < r.g1; ++g) parts.push_back(bias->narrow(0, G.blocks[g].out_start, G.blocks[g].out_size()));
  return at::cat(parts, 0);
}

// On AVX-512 oneDNN computes an NCHW convolution in a layout blocked by 16 channels, so a
// channel count off that multiple is padded up to it and reordered in and out on every call
// (19 channels, ResNet-20 at width 1.2, run as 32). Its channels-last convolution needs
// neither: with the operands copied channels last and the result copied back, a stride-1
// 3x3 conv of 64 images took, forward+backward, 1.47x less time at 19 channels on 32x32,
// 1.51x on 16x16, 1.83x at 4 channels, 1.21x at 8 and 12, 1.14x at 24, 1.10x at 38 (one
// interleaved run each; 0.89-0.92x at 16). Not on AVX2 (0.84-0.99x on 32x32 maps, mixed on
// smaller ones), not for grouped runs (0.5-0.8x at 8 channels a group), not for strided or
// 3-channel (image) inputs, where the same measurements were mixed or lost.
bool channels_last_pays(const at::Tensor& x, const ConvGeom& G, const Run& r) {
  constexpr int64_t kBlock = 16;
  return capability() == Capability::kAvx512 && x.scalar_type() == at::kFloat && !G.depthwise && r.groups == 1 &&
         G.sh == 1 && G.sw == 1 && r.cin >= 4 && (r.cin % kBlock != 0 || r.cout % kBlock != 0);
}

at::Tensor run_input(const at::Tensor& x, const ConvGeom& G, const Run& r) {
  at::Tensor xr = x.narrow(1, r.x0, r.cin);
  return channels_last_pays(x, G, r) ? xr.contiguous(at::MemoryFormat::ChannelsLast) : xr;
}

at::Tensor run_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const ConvGeom& G, const Run& r) {
  return at::convolution(run_input(x, G, r), run_weight(weight, G, r), run_bias(bias, G, r), {G.sh, G.sw},
                         {G.ph, G.pw}, {G.dh, G.dw}, false, {0, 0}, r.groups);
}

// oneDNN's grouped convolution is slow on AVX2 when a group holds few channels on a large
// map: a 32x32 conv of 4 groups of 4 channels took 2.5-3x as long (fwd+bwd) as one call per
// group, 2 groups of 8 about 1.7x; from 16 channels a group, or on 16x16 and smaller maps, the
// two were equal within noise. With AVX-512 the grouped call won (the ResNet-20 ParaDiS step
// ran 11 % slower split), so it stays. Our capability stands in for oneDNN's: the forced
// AVX2 runs hold both to AVX2. So on AVX2 and the baseline, dense blocks of fewer channels
// than this, on maps at least this large, get a call each.
constexpr int64_t kGroupMinChannels = 16;
constexpr int64_t kGroupSplitPixels = 1024;

bool split_groups(const ConvGeom& G, const Block& b) {
  return !G.depthwise && capability() != Capability::kAvx512 && G.H * G.W >= kGroupSplitPixels &&
         b.in_size() < kGroupMinChannels;
}

}  // namespace

std::vector<Run> make_runs(const ConvGeom& G, c10::IntArrayRef offs) {
  std::vector<Run> runs;
  int64_t pos = 0;
  for (size_t g = 0; g < G.blocks.size(); ++g) {
    const Block& b = G.blocks[g];
    if (!runs.empty()) {
      Run& r = runs.back();
      const Block& p = G.blocks[g - 1];
      const bool same_shape = G.depthwise || (b.in_size() == p.in_size() && b.out_size() == p.out_size());
      if (same_shape && offs[g] == r.x0 + r.cin && !split_groups(G, b)) {
        r.g1 = g + 1;
        r.cin += b.in_size();
        r.cout += b.out_size();
        r.groups = G.depthwise ? r.cin : r.groups + 1;
        pos += b.out_size();
        continue;
      }
    }
    runs.push_back(Run{g, g + 1, offs[g], b.in_size(), pos, b.out_size(), G.depthwise ? b.in_size() : 1});
    pos += b.out_size();
  }
  return runs;
}

at::Tensor runs_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const ConvGeom& G, c10::IntArrayRef offs) {
  const auto runs = make_runs(G, offs);
  if (runs.size() == 1) return run_conv(x, weight, bias, G, runs[0]).contiguous();
  at::Tensor out = at::empty({G.N, G.C_out_total, G.Ho, G.Wo}, x.options());
  for (const Run& r : runs) out.narrow(1, r.pos, r.cout).copy_(run_conv(x, weight, bias, G, r));
  return out;
}

void runs_backward(const at::Tensor& go, const at::Tensor& x, const at::Tensor& weight, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw, at::Tensor& gb) {
  const auto runs = make_runs(G, offs);
  const bool whole_x = runs.size() == 1 && runs[0].x0 == 0 && runs[0].cin == G.Cx;
  GradInputWriter gxw(mask[0] && !whole_x ? gx : at::Tensor());
  for (const Run& r : runs) {
    const at::Tensor wr = run_weight(weight, G, r);
    const std::vector<int64_t> bias_sizes{r.cout};
    at::Tensor gor = go.narrow(1, r.pos, r.cout);
    if (channels_last_pays(x, G, r)) gor = gor.contiguous(at::MemoryFormat::ChannelsLast);
    auto grads = at::convolution_backward(gor, run_input(x, G, r), wr,
                                          at::OptionalIntArrayRef(bias_sizes), {G.sh, G.sw}, {G.ph, G.pw},
                                          {G.dh, G.dw}, false, {0, 0}, r.groups, mask);
    if (mask[0]) {
      if (whole_x) {
        gx = std::get<0>(grads).contiguous();  // NCHW again after a channels-last run
      } else if (gxw.begin(r.x0, r.cin)) {
        gx.narrow(1, r.x0, r.cin).add_(std::get<0>(grads));
      } else {
        gx.narrow(1, r.x0, r.cin).copy_(std::get<0>(grads));
      }
    }
    int64_t at_row = 0;
    for (size_t g = r.g0; g < r.g1; ++g) {
      const Block& b = G.blocks[g];
      if (mask[1]) block_weight(gw, b, G.depthwise).add_(std::get<1>(grads).narrow(0, at_row, b.out_size()));
      if (mask[2]) gb.narrow(0, b.out_start, b.out_size()).add_(std::get<2>(grads).narrow(0, at_row, b.out_size()));
      at_row += b.out_size();
    }
  }
  if (mask[0] && !whole_x) gxw.finish();
}

bool GradInputWriter::begin(int64_t lo, int64_t n) {
  int64_t n_written = 0;
  for (int64_t c = lo; c < lo + n; ++c) n_written += written_[c];
  if (n_written > 0 && n_written < n) zero_unwritten(lo, lo + n);
  std::fill(written_.begin() + lo, written_.begin() + lo + n, 1);
  return n_written > 0;
}

void GradInputWriter::finish() { zero_unwritten(0, static_cast<int64_t>(written_.size())); }

// Zeroes each maximal range of unwritten channels in [lo, hi) with one fill.
void GradInputWriter::zero_unwritten(int64_t lo, int64_t hi) {
  for (int64_t c = lo; c < hi;) {
    if (written_[c]) {
      ++c;
      continue;
    }
    int64_t e = c;
    while (e < hi && !written_[e]) ++e;
    gx_.narrow(1, c, e - c).zero_();
    c = e;
  }
}

}  // namespace slimkern::cpu
