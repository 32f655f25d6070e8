// slimkern::sinkhorn: schema and CPU kernel calling the plain-C++ core (core/sinkhorn.h).
// Batched only: a [B, n], b [B, m], M [B, n, m]. The plan and potentials are returned with
// per-problem err / n_iter / status; the Python wrapper turns status into warnings.
// Like every dispatcher op called from Python, this runs with the GIL released.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "core/sinkhorn.h"

namespace slimkern {
namespace {

using solver_checks::as_double;

void check_histogram(const at::Tensor& h, const char* name) {
  const int64_t B = h.size(0), n = h.size(1);
  const double* p = h.const_data_ptr<double>();
  for (int64_t k = 0; k < B; ++k) {
    double mass = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double x = p[k * n + i];
      TORCH_CHECK_VALUE(std::isfinite(x), name, " contains NaN or inf");
      TORCH_CHECK_VALUE(x >= 0.0, name, " must be nonnegative, got ", x, " (problem ", k, ")");
      mass += x;
    }
    TORCH_CHECK_VALUE(mass > 0.0, name, " has zero total mass (problem ", k, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& M, double reg, c10::string_view method,
    int64_t max_iter, double tol, int64_t check_every, const std::optional<at::Tensor>& log_u0,
    const std::optional<at::Tensor>& log_v0) {
  solver_checks::check_cpu_floating(a, "a");
  solver_checks::check_cpu_floating(b, "b");
  solver_checks::check_cpu_floating(M, "M");
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && M.dim() == 3,
                    "expected a [B, n], b [B, m], M [B, n, m], got shapes ", a.sizes(), ", ", b.sizes(), ", ", M.sizes());
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  TORCH_CHECK_VALUE(b.size(0) == B && M.size(0) == B && M.size(1) == n && M.size(2) == m,
                    "shape mismatch: a ", a.sizes(), " and b ", b.sizes(), " need M of shape [", B, ", ", n, ", ", m,
                    "], got ", M.sizes());
  TORCH_CHECK_VALUE(n >= 1 && m >= 1, "a and b must not be empty");
  TORCH_CHECK_VALUE(std::isfinite(reg) && reg > 0.0, "reg must be a finite number > 0, got ", reg);
  TORCH_CHECK_VALUE(max_iter >= 0, "max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK_VALUE(check_every >= 1, "check_every must be >= 1, got ", check_every);
  TORCH_CHECK_VALUE(!std::isnan(tol), "tol must not be NaN");
  solvers::SinkhornOptions opt;
  if (method == "log") opt.method = solvers::SinkhornMethod::kLog;
  else if (method == "standard") opt.method = solvers::SinkhornMethod::kStandard;
  else TORCH_CHECK_VALUE(false, "method must be 'log' or 'standard', got '", std::string(method), "'");
  opt.reg = reg;
  opt.max_iter = max_iter;
  opt.tol = tol;
  opt.check_every = check_every;

  auto ad = as_double(a), bd = as_double(b), Md = as_double(M);
  check_histogram(ad, "a");
  check_histogram(bd, "b");
  solver_checks::check_finite(Md, "M");
  const bool warm = log_u0.has_value() || log_v0.has_value();
  auto opts = a.options().dtype(at::kDouble);
  at::Tensor log_u, log_v;
  if (warm) {
    TORCH_CHECK_VALUE(log_u0.has_value() && log_v0.has_value(), "a warm start needs both log_u and log_v");
    TORCH_CHECK_VALUE(log_u0->sizes() == a.sizes() && log_v0->sizes() == b.sizes(),
                      "warm start shapes ", log_u0->sizes(), " and ", log_v0->sizes(), " must match a ",
                      a.sizes(), " and b ", b.sizes());
    log_u = log_u0->to(at::kDouble).clone(at::MemoryFormat::Contiguous);
    log_v = log_v0->to(at::kDouble).clone(at::MemoryFormat::Contiguous);
    // Entries where the histogram is 0 are ignored (they are -inf in a returned warm start).
    const double* au = ad.const_data_ptr<double>();
    const double* lu = log_u.const_data_ptr<double>();
    for (int64_t i = 0; i < B * n; ++i)
      TORCH_CHECK_VALUE(au[i] == 0.0 || std::isfinite(lu[i]), "warm start log_u must be finite where a > 0");
    const double* bv = bd.const_data_ptr<double>();
    const double* lv = log_v.const_data_ptr<double>();
    for (int64_t j = 0; j < B * m; ++j)
      TORCH_CHECK_VALUE(bv[j] == 0.0 || std::isfinite(lv[j]), "warm start log_v must be finite where b > 0");
  } else {
    log_u = at::empty({B, n}, opts);
    log_v = at::empty({B, m}, opts);
  }
  auto plan = at::empty({B, n, m}, opts);
  std::vector<solvers::SinkhornResult> res(B);
  solvers::sinkhorn_batch(ad.const_data_ptr<double>(), bd.const_data_ptr<double>(), Md.const_data_ptr<double>(),
                          B, n, m, opt, warm, log_u.data_ptr<double>(), log_v.data_ptr<double>(),
                          plan.data_ptr<double>(), res.data());
  auto err = at::empty({B}, opts);
  auto iters = at::empty({B}, opts.dtype(at::kLong));
  auto status = at::empty({B}, opts.dtype(at::kLong));
  for (int64_t k = 0; k < B; ++k) {
    err.data_ptr<double>()[k] = res[k].err;
    iters.data_ptr<int64_t>()[k] = res[k].n_iter;
    status.data_ptr<int64_t>()[k] = res[k].status;
  }
  const auto dt = a.scalar_type();
  return {plan.to(dt), log_u.to(dt), log_v.to(dt), err, iters, status};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def("sinkhorn(Tensor a, Tensor b, Tensor M, float reg, str method, int max_iter, float tol, "
        "int check_every, Tensor? log_u0, Tensor? log_v0) -> "
        "(Tensor plan, Tensor log_u, Tensor log_v, Tensor err, Tensor n_iter, Tensor status)");
}

TORCH_LIBRARY_IMPL(slimkern, CPU, m) { m.impl("sinkhorn", &sinkhorn_cpu); }

}  // namespace slimkern
