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
  SK_ALWAYS_INLINE static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  SK_ALWAYS_INLINE static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // acc[0, L) += the lanes of v, in double. Float lanes are converted half a register at a
  // time: a double vector of L lanes is wider than the registers for float, and GCC then
  // spilled it through the stack (the summing loop of switchable BN ran 2x slower).
  SK_ALWAYS_INLINE static void add_to(double* acc, V v) {
    typedef double DV __attribute__((vector_size(VB)));
    constexpr int kParts = sizeof(double) / sizeof(T);  // 2 for float, 1 for double
    constexpr int HB = VB / kParts;                     // bytes of v converted into one DV
    typedef T H __attribute__((vector_size(HB)));
    for (int h = 0; h < kParts; ++h) {
      H part;
      std::memcpy(&part, reinterpret_cast<const char*>(&v) + h * HB, HB);
      DV a;
      std::memcpy(&a, acc + h * (VB / sizeof(double)), VB);
      a += __builtin_convertvector(part, DV);
      std::memcpy(acc + h * (VB / sizeof(double)), &a, VB);
    }
  }
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
