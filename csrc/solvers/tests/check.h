// A tiny assertion helper for the solver unit tests (no external test framework).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

inline int g_failures = 0;

#define SK_EXPECT(cond)                                                          \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);   \
      ++g_failures;                                                              \
    }                                                                            \
  } while (0)

#define SK_EXPECT_NEAR(x_, y_, tol)                                                            \
  do {                                                                                       \
    const double sk_a = (x_), sk_b = (y_);                                                     \
    if (!(std::fabs(sk_a - sk_b) <= (tol) || (std::isinf(sk_a) && sk_a == sk_b))) {          \
      std::fprintf(stderr, "%s:%d: %s = %.17g, %s = %.17g (tol %g)\n", __FILE__, __LINE__,   \
                   #x_, sk_a, #y_, sk_b, static_cast<double>(tol));                            \
      ++g_failures;                                                                          \
    }                                                                                        \
  } while (0)

inline int report(const char* name) {
  if (g_failures) std::fprintf(stderr, "%s: %d failure(s)\n", name, g_failures);
  else std::printf("%s: all checks passed\n", name);
  return g_failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
