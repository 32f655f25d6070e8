// Chain min-sum (Viterbi), log-space forward-backward and the Lagrangian budget search.
// Plain C++: built into slimkern._C and, standalone, into the ctest unit tests.
#include "viterbi.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace slimkern::solvers {
namespace {

// Forward min-sum pass: D[l][k] = unary[l][k] + min_k' (D[l-1][k'] + W[l-1][k'][k]) with
// W = C, or W = C + gamma * R for the Lagrangian. The loop over k' is outer so the inner
// loop over k is contiguous and vectorises (min, no argmin: the backtrack recomputes it).
inline __attribute__((always_inline)) void forward_body(const double* U, const double* C,
                                                        const double* R, double gamma, int64_t L,
                                                        int64_t K, double* D, double* tmp) {
  for (int64_t k = 0; k < K; ++k) D[k] = U[k];
  for (int64_t l = 1; l < L; ++l) {
    const double* Dp = D + (l - 1) * K;
    double* Dn = D + l * K;
    for (int64_t k = 0; k < K; ++k) tmp[k] = kInf;
    const double* Cl = C + (l - 1) * K * K;
    const double* Rl = R ? R + (l - 1) * K * K : nullptr;
    for (int64_t kp = 0; kp < K; ++kp) {
      const double d = Dp[kp];
      if (d == kInf) continue;  // forbidden state: nothing can follow it
      const double* c = Cl + kp * K;
      if (Rl) {
        const double* r = Rl + kp * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const double w = d + c[k] + gamma * r[k];
          tmp[k] = w < tmp[k] ? w : tmp[k];
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const double w = d + c[k];
          tmp[k] = w < tmp[k] ? w : tmp[k];
        }
      }
    }
    const double* Ul = U + l * K;
    for (int64_t k = 0; k < K; ++k) Dn[k] = Ul[k] + tmp[k];
  }
}

void forward(const double* U, const double* C, const double* R, double gamma, int64_t L, int64_t K, double* D,
             double* tmp) {
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA { forward_body(U, C, R, gamma, L, K, D, tmp); });
}

// Backtrack from the forward table; returns the optimum (or +inf with path = -1).
double backtrack(const double* C, const double* R, double gamma, int64_t L, int64_t K,
                 const double* D, int64_t* path) {
  const double* last = D + (L - 1) * K;
  double best = kInf;
  int64_t kb = -1;
  for (int64_t k = 0; k < K; ++k)
    if (last[k] < best) best = last[k], kb = k;
  if (kb < 0) {
    std::fill(path, path + L, int64_t{-1});
    return kInf;
  }
  path[L - 1] = kb;
  for (int64_t l = L - 1; l >= 1; --l) {
    const int64_t k = path[l];
    const double* Dp = D + (l - 1) * K;
    const double* Cl = C + (l - 1) * K * K;
    const double* Rl = R ? R + (l - 1) * K * K : nullptr;
    double bv = kInf;
    int64_t bk = 0;
    for (int64_t kp = 0; kp < K; ++kp) {
      if (Dp[kp] == kInf) continue;
      const double v = Dp[kp] + Cl[kp * K + k] + (Rl ? gamma * Rl[kp * K + k] : 0.0);
      if (v < bv) bv = v, bk = kp;
    }
    path[l - 1] = bk;
  }
  return best;
}

double path_unary(const double* U, int64_t L, int64_t K, const int64_t* path) {
  double s = 0.0;
  for (int64_t l = 0; l < L; ++l) s += U[l * K + path[l]];
  return s;
}

double path_pairwise(const double* W, int64_t L, int64_t K, const int64_t* path) {
  if (!W) return 0.0;
  double s = 0.0;
  for (int64_t l = 0; l + 1 < L; ++l) s += W[(l * K + path[l]) * K + path[l + 1]];
  return s;
}

// Spread (max - min) of the finite values of x[0..n); 0 when none is finite.
double finite_spread(const double* x, int64_t n) {
  double lo = kInf, hi = -kInf;
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(x[i])) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  return hi >= lo ? hi - lo : 0.0;
}

}  // namespace

std::size_t viterbi_work_size(int64_t L, int64_t K) { return static_cast<std::size_t>(L * K + K); }

double viterbi(const double* unary, const double* pairwise, int64_t L, int64_t K, int64_t* path,
               double* work) {
  if (L <= 0 || K <= 0) return 0.0;
  double* D = work;
  double* tmp = work + L * K;
  forward(unary, pairwise, nullptr, 0.0, L, K, D, tmp);
  return backtrack(pairwise, nullptr, 0.0, L, K, D, path);
}

void viterbi_batch(const double* unary, const double* pairwise, int64_t P, int64_t L, int64_t K,
                   int64_t* path, double* cost) {
  const int64_t un = L * K, pn = (L > 0 ? L - 1 : 0) * K * K;
  const bool par = P > 1 && P * (pn + un) > (int64_t{1} << 16);
#pragma omp parallel if (par)
  {
    std::vector<double> work(viterbi_work_size(L, K));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p)
      cost[p] = viterbi(unary + p * un, pairwise + p * pn, L, K, path + p * L, work.data());
  }
}

std::size_t marginals_work_size(int64_t L, int64_t K) { return static_cast<std::size_t>(2 * L * K + K); }

double viterbi_marginals(const double* unary, const double* pairwise, int64_t L, int64_t K,
                         double temperature, double* marginals, double* work) {
  if (L <= 0 || K <= 0) return 0.0;
  const double inv_t = 1.0 / temperature;
  double* alpha = work;
  double* beta = work + L * K;
  double* tmp = work + 2 * L * K;
  // alpha[l][k] = log sum over prefixes ending in (l, k) of exp(-cost / T).
  for (int64_t k = 0; k < K; ++k) alpha[k] = -unary[k] * inv_t;
  for (int64_t l = 1; l < L; ++l) {
    const double* W = pairwise + (l - 1) * K * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t kp = 0; kp < K; ++kp) tmp[kp] = alpha[(l - 1) * K + kp] - W[kp * K + k] * inv_t;
      alpha[l * K + k] = -unary[l * K + k] * inv_t + log_sum_exp(tmp, K);
    }
  }
  // beta[l][k] = log sum over suffixes after (l, k) of exp(-cost / T).
  for (int64_t k = 0; k < K; ++k) beta[(L - 1) * K + k] = 0.0;
  for (int64_t l = L - 2; l >= 0; --l) {
    const double* W = pairwise + l * K * K;
    for (int64_t kp = 0; kp < K; ++kp) {
      for (int64_t k = 0; k < K; ++k)
        tmp[k] = -W[kp * K + k] * inv_t - unary[(l + 1) * K + k] * inv_t + beta[(l + 1) * K + k];
      beta[l * K + kp] = log_sum_exp(tmp, K);
    }
  }
  const double log_z = log_sum_exp(alpha + (L - 1) * K, K);
  if (log_z == -kInf) {
    std::fill(marginals, marginals + L * K, std::numeric_limits<double>::quiet_NaN());
    return log_z;
  }
  for (int64_t i = 0; i < L * K; ++i) marginals[i] = std::exp(alpha[i] + beta[i] - log_z);
  return log_z;
}

void viterbi_marginals_batch(const double* unary, const double* pairwise, int64_t P, int64_t L,
                             int64_t K, double temperature, double* marginals, double* log_partition) {
  const int64_t un = L * K, pn = (L > 0 ? L - 1 : 0) * K * K;
  const bool par = P > 1 && P * (pn + un) > (int64_t{1} << 14);
#pragma omp parallel if (par)
  {
    std::vector<double> work(marginals_work_size(L, K));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p)
      log_partition[p] = viterbi_marginals(unary + p * un, pairwise + p * pn, L, K, temperature,
                                           marginals + p * un, work.data());
  }
}

BudgetResult viterbi_budget(const double* unary, const double* pairwise, const double* resource,
                            int64_t L, int64_t K, double budget, int max_iter, int64_t* path) {
  BudgetResult res;
  if (L <= 0 || K <= 0) return res;
  const int64_t pn = (L - 1) * K * K;
  // gamma * inf is NaN at gamma = 0, so a forbidden pair (+inf in either table) lives in
  // the cost table only and its resource is set to 0.
  std::vector<double> cm(pn), rm(pn), ronly(pn), umask(L * K), D(L * K), tmp(K);
  for (int64_t i = 0; i < pn; ++i) {
    const double c = pairwise ? pairwise[i] : 0.0;
    const bool forbidden = std::isinf(resource[i]) || std::isinf(c);
    cm[i] = forbidden ? kInf : c;
    rm[i] = forbidden ? 0.0 : resource[i];
    ronly[i] = forbidden ? kInf : resource[i];
  }
  for (int64_t i = 0; i < L * K; ++i) umask[i] = std::isinf(unary[i]) ? kInf : 0.0;

  std::vector<int64_t> trial(L);
  auto solve = [&](double gamma, int64_t* out) {
    forward(unary, cm.data(), rm.data(), gamma, L, K, D.data(), tmp.data());
    ++res.solves;
    return backtrack(cm.data(), rm.data(), gamma, L, K, D.data(), out);
  };
  auto used = [&](const int64_t* p) { return path_pairwise(rm.data(), L, K, p); };
  auto finish = [&](const int64_t* p, double gamma, int status) {
    std::copy(p, p + L, path);
    res.cost = path_unary(unary, L, K, p) + path_pairwise(cm.data(), L, K, p);
    res.resource = used(p);
    res.gamma = gamma;
    res.status = status;
    return res;
  };

  if (solve(0.0, trial.data()) == kInf) {
    std::fill(path, path + L, int64_t{-1});
    res.status = kBudgetNoPath;
    res.cost = res.resource = kInf;
    return res;
  }
  const double r0 = used(trial.data());
  if (r0 <= budget) return finish(trial.data(), 0.0, kBudgetOk);

  // gamma -> infinity minimises the resource alone: if that path is over budget, no gamma helps.
  std::vector<int64_t> least(L);
  forward(umask.data(), ronly.data(), nullptr, 0.0, L, K, D.data(), tmp.data());
  backtrack(ronly.data(), nullptr, 0.0, L, K, D.data(), least.data());
  const double rmin = used(least.data());
  if (rmin > budget) return finish(least.data(), kInf, kBudgetInfeasible);

  // Bracket [lo, hi] with lo infeasible, hi feasible. The first guess is the multiplier at
  // which any cost difference (at most `spread`) is outweighed by the resource gap r0 - rmin.
  double spread = finite_spread(unary, L * K) * static_cast<double>(L);
  if (pairwise) spread += finite_spread(cm.data(), pn) * static_cast<double>(L - 1);
  double lo = 0.0, hi = spread / std::max(r0 - rmin, 1e-300);
  if (!(hi > 0.0) || !std::isfinite(hi)) hi = 1.0;
  std::vector<int64_t> best(L);
  for (;;) {
    solve(hi, best.data());
    if (used(best.data()) <= budget) break;
    lo = hi;
    hi *= 2.0;
    if (!std::isfinite(hi)) return finish(least.data(), kInf, kBudgetOk);
  }
  for (int it = 0; it < max_iter; ++it) {
    const double mid = lo + 0.5 * (hi - lo);
    if (!(mid > lo && mid < hi)) break;  // bracket at floating-point resolution
    solve(mid, trial.data());
    if (used(trial.data()) <= budget) {
      hi = mid;
      best.swap(trial);
    } else {
      lo = mid;
    }
  }
  return finish(best.data(), hi, kBudgetOk);
}

void viterbi_budget_batch(const double* unary, const double* pairwise, const double* resource,
                          int64_t P, int64_t L, int64_t K, const double* budget, int max_iter,
                          int64_t* path, BudgetResult* results) {
  const int64_t un = L * K, pn = (L > 0 ? L - 1 : 0) * K * K;
  // Each platform costs ~max_iter Viterbi solves; threads pay off once that is ~100 µs of work,
  // about 2^18 pair updates (7 platforms x 13 x 14 x 14 x 32 solves, 570k, took 350 us on one
  // thread and 0.2 ms on two).
  const bool par = P > 1 && P * pn * (max_iter + 2) > (int64_t{1} << 18);
#pragma omp parallel for schedule(dynamic) if (par)
  for (int64_t p = 0; p < P; ++p)
    results[p] = viterbi_budget(unary + p * un, pairwise ? pairwise + p * pn : nullptr,
                                resource + p * pn, L, K, budget[p], max_iter, path + p * L);
}

}  // namespace slimkern::solvers
