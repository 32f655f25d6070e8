// Argument checks and the channel layout of switchable batch norm, shared by the CPU and
// CUDA kernels. Everything is validated here before any kernel reads or writes memory.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string_view>
#include <type_traits>
#include <vector>

#include "slimkern/bn_math.h"
#include "slimkern/checks.h"

namespace slimkern {
namespace bn {

// x viewed as [N, Cp, HW]; packed channel p belongs to block block_of[p], reads affine
// channel chan_full[p] and statistics row chan_row[p].
struct Layout {
  int64_t G = 0, Cp = 0, C = 0, S = 0, N = 0, HW = 0;
  std::vector<int64_t> start, stop, rows;
  std::vector<int64_t> chan_full, chan_row;
  int64_t count() const { return N * HW; }
};

inline int parse_activation(std::string_view a) {
  if (a == "none") return kNone;
  if (a == "relu") return kRelu;
  if (a == "relu6") return kRelu6;
  TORCH_CHECK(false, "activation must be one of 'none', 'relu', 'relu6', got '", std::string(a), "'");
  return kNone;
}

inline void check_param(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  check_same(*t, name, x, "x");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, " must be the full layer's [", C,
              "] affine parameter (C_full from running_mean), got shape ", t->sizes());
}

// Parses the flat [G*2] block table against a layer of C channels.
inline Layout parse_blocks2(c10::IntArrayRef blocks, int64_t C) {
  Layout L;
  L.C = C;
  TORCH_CHECK(blocks.size() % 2 == 0, "blocks must have 2 entries per block (start, stop); got ",
              blocks.size(), " numbers");
  L.G = static_cast<int64_t>(blocks.size()) / 2;
  TORCH_CHECK(L.G > 0, "blocks is empty: at least one block (G >= 1) is required");
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t a = blocks[2 * g], b = blocks[2 * g + 1];
    TORCH_CHECK(a >= 0 && b <= L.C && a <= b, "block ", g, ": channel range [", a, ", ", b,
                ") is not inside the layer's ", L.C, " channels (or stop < start)");
    TORCH_CHECK(b > a, "block ", g, " is empty: [", a, ", ", b, ")");
    L.start.push_back(a);
    L.stop.push_back(b);
    for (int64_t c = a; c < b; ++c) L.chan_full.push_back(c);
  }
  L.Cp = static_cast<int64_t>(L.chan_full.size());
  return L;
}

// Parses blocks and the [G] stat rows against the [S, C] running statistics.
inline Layout parse_layout(const at::Tensor& running_mean, const at::Tensor& running_var,
                           c10::IntArrayRef blocks, c10::IntArrayRef stat_rows) {
  TORCH_CHECK(running_mean.dim() == 2, "running_mean must be [S, C_full] (one row per statistics "
              "set), got shape ", running_mean.sizes());
  TORCH_CHECK(running_var.sizes() == running_mean.sizes(), "running_var must have the shape of "
              "running_mean ", running_mean.sizes(), ", got ", running_var.sizes());
  check_same(running_var, "running_var", running_mean, "running_mean");
  Layout L = parse_blocks2(blocks, running_mean.size(1));
  L.S = running_mean.size(0);
  TORCH_CHECK(static_cast<int64_t>(stat_rows.size()) == L.G, "stat_rows has ", stat_rows.size(),
              " entries but there are ", L.G, " blocks");
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t r = stat_rows[g];
    TORCH_CHECK(r >= 0 && r < L.S, "stat_rows[", g, "] = ", r, " is out of range for ", L.S,
                " statistics rows");
    L.rows.push_back(r);
    for (int64_t c = L.start[g]; c < L.stop[g]; ++c) L.chan_row.push_back(r);
  }
  return L;
}

// Two blocks updating the same channels of the same row in one call would make the
// update order-dependent (and count the batch twice), so training refuses it.
inline void check_no_shared_updates(const Layout& L) {
  for (int64_t g = 0; g < L.G; ++g)
    for (int64_t h = g + 1; h < L.G; ++h)
      TORCH_CHECK(!(L.rows[g] == L.rows[h] && L.start[g] < L.stop[h] && L.start[h] < L.stop[g]),
                  "blocks ", g, " and ", h, " both update channels [", std::max(L.start[g], L.start[h]),
                  ", ", std::min(L.stop[g], L.stop[h]), ") of stat row ", L.rows[g],
                  " in one training call; give them different stat_rows or use separate calls");
}

inline Layout check_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, c10::IntArrayRef blocks,
                            c10::IntArrayRef stat_rows, bool training) {
  TORCH_CHECK(x.defined(), "x is undefined");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "x must be [N, C] or [N, C, *spatial] with up to 3 spatial "
              "dims, got a ", x.dim(), "-d tensor with shape ", x.sizes());
  check_floating(x, "x");
  check_same(running_mean, "running_mean", x, "x");
  Layout L = parse_layout(running_mean, running_var, blocks, stat_rows);
  check_param(weight, "weight", x, L.C);
  check_param(bias, "bias", x, L.C);
  TORCH_CHECK(x.size(1) == L.Cp, "x has ", x.size(1), " channels but the blocks hold ", L.Cp,
              ": x's channel count does not match the blocks");
  L.N = x.size(0);
  L.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L.HW *= x.size(d);
  if (training) {
    TORCH_CHECK(L.N * L.HW > 1, "Expected more than 1 value per channel when training, got x of shape ",
                x.sizes());
    check_no_shared_updates(L);
  }
  return L;
}

// The dtype of the saved batch statistics: float for reduced-precision x, else x's dtype.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_saved(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t Cp) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == stat_dtype(x.scalar_type()), name, " must have dtype ",
              stat_dtype(x.scalar_type()), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == Cp, name, " must be [", Cp, "] (one value per packed channel), got ",
              t.sizes());
}

inline void check_num_batches(const c10::optional<at::Tensor>& nbt, const Layout& L, const at::Tensor& rm,
                              const c10::optional<double>& momentum) {
  const bool has = nbt.has_value() && nbt->defined();
  TORCH_CHECK(momentum.has_value() || has, "momentum=None (cumulative moving average) needs "
              "num_batches_tracked, an int64 [S] tensor of per-row batch counts");
  if (!has) return;
  TORCH_CHECK(nbt->scalar_type() == at::kLong, "num_batches_tracked must be int64, got ", nbt->scalar_type());
  TORCH_CHECK(nbt->device() == rm.device(), "num_batches_tracked must be on running_mean's device ", rm.device(),
              ", got ", nbt->device());
  TORCH_CHECK(nbt->dim() == 1 && nbt->size(0) == L.S, "num_batches_tracked must be [", L.S,
              "] (one count per statistics row), got shape ", nbt->sizes());
}

// Checks of switchable_batch_norm_backward; returns the layout with N and HW filled in.
inline Layout check_backward(const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                             const at::Tensor& save_var, c10::IntArrayRef blocks, int64_t num_channels) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "x must be [N, C] or [N, C, *spatial], got shape ", x.sizes());
  Layout L = parse_blocks2(blocks, num_channels);
  check_same(grad_y, "grad_y", x, "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(x.size(1) == L.Cp, "x has ", x.size(1), " channels but the blocks hold ", L.Cp);
  check_param(weight, "weight", x, L.C);
  check_param(bias, "bias", x, L.C);
  check_saved(save_mean, "save_mean", x, L.Cp);
  check_saved(save_var, "save_var", x, L.Cp);
  L.N = x.size(0);
  L.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L.HW *= x.size(d);
  return L;
}

// Checks of switchable_batch_norm_update_stats_ (the caller checks running_mean's dtype).
inline Layout check_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const c10::optional<at::Tensor>& num_batches_tracked, const at::Tensor& save_mean,
                                 const at::Tensor& save_var, c10::IntArrayRef blocks, c10::IntArrayRef stat_rows,
                                 int64_t count, const c10::optional<double>& momentum) {
  const Layout L = parse_layout(running_mean, running_var, blocks, stat_rows);
  check_no_shared_updates(L);
  check_num_batches(num_batches_tracked, L, running_mean, momentum);
  check_saved(save_mean, "save_mean", running_mean, L.Cp);
  check_saved(save_var, "save_var", running_mean, L.Cp);
  TORCH_CHECK(count > 1, "count (values per channel in the batch) must be > 1 to update running statistics, got ",
              count);
  return L;
}

// Calls f with the activation code as a compile-time constant (std::integral_constant).
template <typename F>
void dispatch_activation(int act, F&& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kRelu6: f(std::integral_constant<int, kRelu6>{}); break;
    default: f(std::integral_constant<int, kNone>{}); break;
  }
}

}  // namespace bn
}  // namespace slimkern
