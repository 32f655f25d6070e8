// Min-sum chain MRF solvers in plain C++ (no torch): Viterbi, the smoothed (log-sum-exp)
// Viterbi marginals of AOWS (Berman et al., CVPR 2020) and the Lagrangian budget search.
//
// Layout, row-major doubles:
//   unary    [L, K]          cost of choice k at layer l; +inf forbids it
//   pairwise [L-1, K, K]     cost of (k at layer l, k' at layer l+1) = pairwise[l][k][k']
// A chain with L = 1 has no pairwise terms (pointer may be null).
#pragma once

#include <cstddef>
#include <cstdint>

namespace slimkern::solvers {

// Doubles of scratch one viterbi() call needs.
std::size_t viterbi_work_size(int64_t L, int64_t K);

// Minimal sum of unary and pairwise costs over all paths; writes the minimiser to
// path[L]. When every path is forbidden returns +inf and fills path with -1.
double viterbi(const double* unary, const double* pairwise, int64_t L, int64_t K, int64_t* path,
               double* work);

// P independent chains (unary [P, L, K], pairwise [P, L-1, K, K]); OpenMP over P.
void viterbi_batch(const double* unary, const double* pairwise, int64_t P, int64_t L, int64_t K,
                   int64_t* path, double* cost);

// Doubles of scratch one viterbi_marginals() call needs.
std::size_t marginals_work_size(int64_t L, int64_t K);

// Per-layer marginals p_l(k) ∝ sum over paths through (l, k) of exp(-cost(path) / T), by
// forward-backward in log space. Writes marginals[L, K]; returns log Z with
// Z = sum over paths of exp(-cost / T). When every path is forbidden returns -inf and
// fills the marginals with NaN.
double viterbi_marginals(const double* unary, const double* pairwise, int64_t L, int64_t K,
                         double temperature, double* marginals, double* work);

void viterbi_marginals_batch(const double* unary, const double* pairwise, int64_t P, int64_t L,
                             int64_t K, double temperature, double* marginals, double* log_partition);

enum BudgetStatus : int {
  kBudgetOk = 0,          // path meets the budget
  kBudgetInfeasible = 1,  // even the least-resource path exceeds the budget
  kBudgetNoPath = 2,      // every path is forbidden (+inf)
};

struct BudgetResult {
  double cost = 0.0;      // unary + pairwise cost of the returned path (without gamma)
  double resource = 0.0;  // resource of the returned path
  double gamma = 0.0;     // the multiplier the path is optimal for
  int status = kBudgetOk;
  int solves = 0;         // Viterbi solves performed (bracketing + bisection)
};

// Lagrangian budget search: the smallest gamma >= 0 (bisection, max_iter halvings of the
// bracket) whose min-sum path of  unary + pairwise + gamma * resource  uses at most
// `budget` resource. pairwise may be null (no pairwise cost). resource [L-1, K, K] (+inf
// forbids a pair). Returns the path at the feasible end of the final bracket.
BudgetResult viterbi_budget(const double* unary, const double* pairwise, const double* resource,
                            int64_t L, int64_t K, double budget, int max_iter, int64_t* path);

void viterbi_budget_batch(const double* unary, const double* pairwise, const double* resource,
                          int64_t P, int64_t L, int64_t K, const double* budget, int max_iter,
                          int64_t* path, BudgetResult* results);

}  // namespace slimkern::solvers
