// Input checks shared by the solver ops. The cores work on contiguous float64 copies; the
// scans below run on those copies, before anything is written.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace slimkern::solver_checks {

inline at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

inline void check_cpu_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the C++ solver, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
}

// Costs may be +inf (forbidden) but never NaN or -inf (the minimum would be unbounded).
inline void check_costs(const at::Tensor& t, const char* name) {
  const double* p = t.const_data_ptr<double>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(!std::isnan(p[i]), name, " contains NaN");
    TORCH_CHECK_VALUE(p[i] != -INFINITY, name, " contains -inf (costs must be > -inf; +inf forbids a choice)");
  }
}

inline void check_finite(const at::Tensor& t, const char* name) {
  const double* p = t.const_data_ptr<double>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i)
    TORCH_CHECK_VALUE(std::isfinite(p[i]), name, " contains NaN or inf");
}

}  // namespace slimkern::solver_checks
