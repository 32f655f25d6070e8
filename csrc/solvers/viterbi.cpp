// slimkern::viterbi, viterbi_marginals, viterbi_budget: schemas and CPU kernels calling the
// plain-C++ core (core/viterbi.h). Batched only: the Python wrapper adds the platform axis.
// Like every dispatcher op called from Python, these run with the GIL released.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "core/viterbi.h"

namespace slimkern {
namespace {

using solver_checks::as_double;

struct Chain {
  at::Tensor unary, pairwise;
  int64_t P, L, K;
};

Chain check_chain(const at::Tensor& unary, const at::Tensor& pairwise, const char* pname) {
  solver_checks::check_cpu_floating(unary, "unary");
  solver_checks::check_cpu_floating(pairwise, pname);
  TORCH_CHECK_VALUE(unary.dim() == 3, "unary must be [P, L, K], got shape ", unary.sizes());
  const int64_t P = unary.size(0), L = unary.size(1), K = unary.size(2);
  TORCH_CHECK_VALUE(L >= 1 && K >= 1, "unary needs at least one layer and one choice, got shape ", unary.sizes());
  TORCH_CHECK_VALUE(pairwise.dim() == 4 && pairwise.size(0) == P && pairwise.size(1) == L - 1 &&
                        pairwise.size(2) == K && pairwise.size(3) == K,
                    pname, " must be [P, L-1, K, K] = [", P, ", ", L - 1, ", ", K, ", ", K,
                    "] to match unary ", unary.sizes(), ", got shape ", pairwise.sizes());
  Chain c{as_double(unary), as_double(pairwise), P, L, K};
  solver_checks::check_costs(c.unary, "unary");
  solver_checks::check_costs(c.pairwise, pname);
  return c;
}

std::tuple<at::Tensor, at::Tensor> viterbi_cpu(const at::Tensor& unary, const at::Tensor& pairwise) {
  Chain c = check_chain(unary, pairwise, "pairwise");
  auto path = at::empty({c.P, c.L}, unary.options().dtype(at::kLong));
  auto cost = at::empty({c.P}, unary.options().dtype(at::kDouble));
  solvers::viterbi_batch(c.unary.const_data_ptr<double>(), c.pairwise.const_data_ptr<double>(), c.P,
                         c.L, c.K, path.data_ptr<int64_t>(), cost.data_ptr<double>());
  return {path, cost.to(unary.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> viterbi_marginals_cpu(const at::Tensor& unary,
                                                         const at::Tensor& pairwise,
                                                         double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a finite number > 0, got ", temperature);
  Chain c = check_chain(unary, pairwise, "pairwise");
  auto marg = at::empty({c.P, c.L, c.K}, unary.options().dtype(at::kDouble));
  auto log_z = at::empty({c.P}, unary.options().dtype(at::kDouble));
  solvers::viterbi_marginals_batch(c.unary.const_data_ptr<double>(), c.pairwise.const_data_ptr<double>(),
                                   c.P, c.L, c.K, temperature, marg.data_ptr<double>(),
                                   log_z.data_ptr<double>());
  return {marg.to(unary.scalar_type()), log_z.to(unary.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> viterbi_budget_cpu(
    const at::Tensor& unary, const std::optional<at::Tensor>& pairwise, const at::Tensor& resource,
    const at::Tensor& budget, int64_t max_iter) {
  TORCH_CHECK_VALUE(max_iter >= 0, "max_iter must be >= 0, got ", max_iter);
  Chain c = check_chain(unary, resource, "resource_pairwise");
  at::Tensor pw;
  if (pairwise.has_value()) pw = check_chain(unary, *pairwise, "pairwise").pairwise;
  solver_checks::check_cpu_floating(budget, "budget");
  TORCH_CHECK_VALUE(budget.dim() == 1 && budget.size(0) == c.P, "budget must be [P] = [", c.P,
                    "], got shape ", budget.sizes());
  auto bud = as_double(budget);
  solver_checks::check_costs(bud, "budget");
  {
    const double* r = c.pairwise.const_data_ptr<double>();
    for (int64_t i = 0; i < c.pairwise.numel(); ++i)
      TORCH_CHECK_VALUE(r[i] >= 0.0, "resource_pairwise must be >= 0 (+inf forbids a pair), got ", r[i]);
  }
  auto path = at::empty({c.P, c.L}, unary.options().dtype(at::kLong));
  std::vector<solvers::BudgetResult> res(c.P);
  solvers::viterbi_budget_batch(c.unary.const_data_ptr<double>(),
                                pw.defined() ? pw.const_data_ptr<double>() : nullptr,
                                c.pairwise.const_data_ptr<double>(), c.P, c.L, c.K,
                                bud.const_data_ptr<double>(), static_cast<int>(max_iter),
                                path.data_ptr<int64_t>(), res.data());
  auto opts = unary.options().dtype(at::kDouble);
  auto cost = at::empty({c.P}, opts), used = at::empty({c.P}, opts), gamma = at::empty({c.P}, opts);
  auto status = at::empty({c.P}, unary.options().dtype(at::kLong));
  for (int64_t p = 0; p < c.P; ++p) {
    cost.data_ptr<double>()[p] = res[p].cost;
    used.data_ptr<double>()[p] = res[p].resource;
    gamma.data_ptr<double>()[p] = res[p].gamma;
    status.data_ptr<int64_t>()[p] = res[p].status;
  }
  const auto dt = unary.scalar_type();
  return {path, cost.to(dt), used.to(dt), gamma.to(dt), status};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimkern, m) {
  m.def("viterbi(Tensor unary, Tensor pairwise) -> (Tensor path, Tensor cost)");
  m.def("viterbi_marginals(Tensor unary, Tensor pairwise, float temperature) -> (Tensor marginals, Tensor log_partition)");
  m.def("viterbi_budget(Tensor unary, Tensor? pairwise, Tensor resource, Tensor budget, int max_iter) -> "
        "(Tensor path, Tensor cost, Tensor resource_used, Tensor gamma, Tensor status)");
}

TORCH_LIBRARY_IMPL(slimkern, CPU, m) {
  m.impl("viterbi", &viterbi_cpu);
  m.impl("viterbi_marginals", &viterbi_marginals_cpu);
  m.impl("viterbi_budget", &viterbi_budget_cpu);
}

}  // namespace slimkern
