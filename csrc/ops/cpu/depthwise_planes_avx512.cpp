// The depthwise planes for AVX-512: 16 lanes, masks in mask registers (depthwise_planes.h).
#include "depthwise_planes_isa.h"

#if SK_DW_PLANES
#include <immintrin.h>

// Everything below is compiled for AVX-512; only headers without inline code come before.
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
// GCC 12 flags the deliberately undefined source register inside its own masked-load intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec_avx512.h"

namespace slimkern::cpu::avx512 {
namespace {

struct Vec : VecOps {
  static M column(const DwPlane& g, int64_t v, int64_t kw) { return g.masks[v * g.KW + kw]; }
};

}  // namespace
}  // namespace slimkern::cpu::avx512

#define SK_DW_ISA avx512
#include "depthwise_planes_kernel.h"
#undef SK_DW_ISA

#endif
