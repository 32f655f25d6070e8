// Which instruction set the CPU kernels run with, chosen once per process at run time.
//
// Every vectorised CPU loop is compiled three times -- for the x86-64 baseline (SSE2), for
// AVX2+FMA and for AVX-512 -- and `run_for_capability` calls the build that matches
// `capability()`. That is the widest the processor has, unless the environment variable
// SLIMKERN_CPU_CAPABILITY (default | avx2 | avx512, like ATen's ATEN_CPU_CAPABILITY) asks
// for a narrower one: so the AVX2 and baseline paths are tested on an AVX-512 machine too.
// A request above what the processor has is capped at the hardware (never an illegal
// instruction); an unknown value is ignored with a message on stderr (the Python side
// also warns, slimkern/_library.py).
//
// No torch here: the plain-C++ solver core includes this too (cmake/ builds it standalone).
#pragma once

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace slimkern::cpu {

enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAvx512: return "avx512";
    case Capability::kAvx2: return "avx2";
    default: return "default";
  }
}

// What the processor supports. AVX-512 means F+BW+DQ+VL (what our AVX-512 kernels use);
// AVX2 means AVX2+FMA.
inline Capability hardware_capability() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Capability hw = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return Capability::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::kAvx2;
    return Capability::kDefault;
  }();
  return hw;
#else
  return Capability::kDefault;
#endif
}

// The value of SLIMKERN_CPU_CAPABILITY, lower-cased; "" when unset.
inline std::string requested_capability() {
  const char* env = std::getenv("SLIMKERN_CPU_CAPABILITY");
  std::string s = env ? env : "";
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// The capability the kernels use: min(hardware, SLIMKERN_CPU_CAPABILITY). Read once.
inline Capability capability() {
  static const Capability chosen = [] {
    const Capability hw = hardware_capability();
    const std::string req = requested_capability();
    Capability want = hw;
    if (req == "default") {
      want = Capability::kDefault;
    } else if (req == "avx2") {
      want = Capability::kAvx2;
    } else if (req == "avx512") {
      want = Capability::kAvx512;
    } else if (!req.empty()) {
      std::fprintf(stderr,
                   "slimkern: SLIMKERN_CPU_CAPABILITY=%s is not one of default, avx2, avx512; using %s\n",
                   req.c_str(), capability_name(hw));
    }
    return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
  }();
  return chosen;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The body of f is compiled into each wrapper with the wrapper's instruction set, so f must
// be inlined there: pass lambdas marked SK_INLINE_LAMBDA whose callees are inline too.
#define SK_INLINE_LAMBDA __attribute__((always_inline))
template <typename F>
__attribute__((noinline)) void run_default(const F& f) {
  f();
}
template <typename F>
__attribute__((noinline, target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
template <typename F>
__attribute__((noinline, target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) void run_avx512(const F& f) {
  f();
}

// Runs f compiled for `c` (which must not exceed hardware_capability()).
template <typename F>
void run_for_capability(Capability c, const F& f) {
  switch (c) {
    case Capability::kAvx512: return run_avx512(f);
    case Capability::kAvx2: return run_avx2(f);
    default: return run_default(f);
  }
}
#else
#define SK_INLINE_LAMBDA
template <typename F>
void run_for_capability(Capability, const F& f) {
  f();
}
#endif

// Runs f compiled for the capability in use.
template <typename F>
void run_vectorized(const F& f) {
  run_for_capability(capability(), f);
}

}  // namespace slimkern::cpu
