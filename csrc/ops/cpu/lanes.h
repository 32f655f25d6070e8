// SIMD lanes as GCC vector types of VB bytes, the register width of the instruction set the
// calling loop is compiled for (64 on AVX-512, 32 on AVX2, 16 on the x86-64 baseline; see
// run_for_capability in slimkern/cpu_capability.h). Plain loops with a conditional do not
// vectorise, and a vector wider than the registers is split by GCC into slow code: with
// 64-byte vectors the AVX2 build of switchable batch norm ran the forward+backward of a
// 64 x 64 x 32 x 32 batch 1.8x slower than the AVX-512 one, no faster than the baseline.
// Used by switchable batch norm and the channels-last depthwise engine.
#pragma once

#include <cstring>
#include <type_traits>

#define SK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace slimkern::cpu {

template <typename T, int VB>
struct Lanes {
  typedef T V __attribute__((vector_size(VB)));
  static constexpr int L = VB / sizeof(T);
  typedef double D __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));  // L doubles
  SK_ALWAYS_INLINE static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  SK_ALWAYS_INLINE static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  SK_ALWAYS_INLINE static double sum(V v) {
    double s = 0;
    for (int j = 0; j < L; ++j) s += v[j];
    return s;
  }
};

// The compile-time register width handed to a capability's loop body.
template <int VB>
using Width = std::integral_constant<int, VB>;

}  // namespace slimkern::cpu
