// Stride-1 depthwise planes: the column masks and the choice of build (see depthwise_planes.h).
#include "depthwise_planes.h"

#include "depthwise_planes_isa.h"
#include "slimkern/cpu_capability.h"

namespace slimkern::cpu {

// Masked-off lanes load zero, and masked loads (AVX-512 and AVX2's vmaskmov alike) never
// touch (or fault on) the addresses of masked-off lanes, so taps past a row's ends need no
// special case.
void dw_column_masks(DwPlane& g) {
  const int64_t nv = (g.Wout + 15) / 16;
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      unsigned m = 0;
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t c = 16 * v + lane, ic = c + g.coff[kw];
        if (c < g.Wout && ic >= 0 && ic < g.Win) m |= 1u << lane;
      }
      g.masks[v * g.KW + kw] = static_cast<uint16_t>(m);
    }
}

#if SK_DW_PLANES
bool have_depthwise_planes() { return capability() != Capability::kDefault; }

void dw_correlate(const float* in, const float* w, float bias, bool accumulate, float* out, const DwPlane& g) {
  if (capability() == Capability::kAvx512) return avx512::correlate(in, w, bias, accumulate, out, g);
  avx2::correlate(in, w, bias, accumulate, out, g);
}

void dw_weight_grad(const float* go, const float* in, const DwPlane& g, float* gw, float* gb) {
  if (capability() == Capability::kAvx512) return avx512::weight_grad(go, in, g, gw, gb);
  avx2::weight_grad(go, in, g, gw, gb);
}
#else  // no x86 builds of the planes: callers take the other engines, these are never reached
bool have_depthwise_planes() { return false; }
void dw_correlate(const float*, const float*, float, bool, float*, const DwPlane&) {}
void dw_weight_grad(const float*, const float*, const DwPlane&, float*, float*) {}
#endif

}  // namespace slimkern::cpu
