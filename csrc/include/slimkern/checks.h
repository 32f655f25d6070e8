// Input checks shared by every op. Messages name the argument and the problem in
// words a PyTorch user understands; every op validates before it writes anything.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace slimkern {

// One row of a block table: (in_start, in_stop, out_start, out_stop) in weight coordinates.
struct Block {
  int64_t in_start, in_stop, out_start, out_stop;
  int64_t in_size() const { return in_stop - in_start; }
  int64_t out_size() const { return out_stop - out_start; }
};

// Checks that `t` is defined and has the expected dimensionality.
inline void check_rank(const at::Tensor& t, const char* name, std::initializer_list<int64_t> ranks) {
  bool ok = false;
  for (auto r : ranks) ok = ok || t.dim() == r;
  TORCH_CHECK(ok, name, " has the wrong rank: got a ", t.dim(), "-d tensor with shape ", t.sizes());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Parses a flat block table [G*4] (the schema's int[]) and checks every range
// against the weight's extents: 0 <= start <= stop <= extent and the block is not empty.
inline std::vector<Block> parse_blocks(c10::IntArrayRef flat, int64_t in_extent, int64_t out_extent) {
  TORCH_CHECK(flat.size() % 4 == 0, "blocks must have 4 entries per block (in_start, in_stop, "
              "out_start, out_stop); got ", flat.size(), " numbers");
  const int64_t G = static_cast<int64_t>(flat.size()) / 4;
  TORCH_CHECK(G > 0, "blocks is empty: at least one block (G >= 1) is required");
  std::vector<Block> blocks(G);
  for (int64_t g = 0; g < G; ++g) {
    Block b{flat[4 * g], flat[4 * g + 1], flat[4 * g + 2], flat[4 * g + 3]};
    TORCH_CHECK(b.in_start >= 0 && b.in_stop >= b.in_start && b.in_stop <= in_extent,
                "block ", g, ": input range [", b.in_start, ", ", b.in_stop,
                ") is not inside the weight's ", in_extent, " input channels (or stop < start)");
    TORCH_CHECK(b.out_start >= 0 && b.out_stop >= b.out_start && b.out_stop <= out_extent,
                "block ", g, ": output range [", b.out_start, ", ", b.out_stop,
                ") is not inside the weight's ", out_extent, " output channels (or stop < start)");
    TORCH_CHECK(b.in_size() > 0 && b.out_size() > 0, "block ", g, " is empty: (", b.in_start, ", ",
                b.in_stop, ", ", b.out_start, ", ", b.out_stop, ")");
    blocks[g] = b;
  }
  return blocks;
}

// Checks x_offsets (one per block) so that every block's input window lies inside x.
inline void check_x_offsets(const std::vector<Block>& blocks, c10::IntArrayRef x_offsets, int64_t x_channels) {
  TORCH_CHECK(static_cast<size_t>(x_offsets.size()) == blocks.size(), "x_offsets has ", x_offsets.size(),
              " entries but there are ", blocks.size(), " blocks");
  for (size_t g = 0; g < blocks.size(); ++g) {
    // No lo + in_size: an offset near INT64_MAX would overflow it past the check.
    const int64_t lo = x_offsets[g], n = blocks[g].in_size();
    TORCH_CHECK(lo >= 0 && n <= x_channels && lo <= x_channels - n, "block ", g, " reads ", n,
                " input channels from offset ", lo, " but x has ", x_channels,
                " channels: x's channel count does not match the blocks");
  }
}

inline int64_t total_out(const std::vector<Block>& blocks) {
  int64_t n = 0;
  for (const auto& b : blocks) n += b.out_size();
  return n;
}

}  // namespace slimkern
