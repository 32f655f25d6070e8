// The per-instruction-set builds of the depthwise planes (depthwise_planes_avx512.cpp,
// depthwise_planes_avx2.cpp): the same kernel source, depthwise_planes_kernel.h.
#pragma once

#include "depthwise_planes.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_DW_PLANES 1
#else
#define SK_DW_PLANES 0
#endif

namespace slimkern::cpu {
namespace avx512 {
void correlate(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g);
void weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb);
}  // namespace avx512
namespace avx2 {
void correlate(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g);
void weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb);
}  // namespace avx2
}  // namespace slimkern::cpu
