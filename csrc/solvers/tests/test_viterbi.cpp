// Unit tests of the chain solvers against brute-force enumeration of every path.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "../core/viterbi.h"
#include "check.h"

using namespace slimkern::solvers;

namespace {

const double inf = std::numeric_limits<double>::infinity();

struct Chain {
  int64_t L, K;
  std::vector<double> unary, pairwise, resource;
};

Chain random_chain(std::mt19937& rng, int64_t L, int64_t K, double p_inf) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  Chain c{L, K, std::vector<double>(L * K), std::vector<double>((L - 1) * K * K),
          std::vector<double>((L - 1) * K * K)};
  for (auto& x : c.unary) x = u01(rng) < p_inf ? inf : u01(rng) * 3.0 - 1.0;
  for (auto& x : c.pairwise) x = u01(rng) < p_inf ? inf : u01(rng);
  for (auto& x : c.resource) x = u01(rng) * 2.0;
  return c;
}

// Calls fn(path) for every one of the K^L paths.
void for_each_path(int64_t L, int64_t K, const std::function<void(const std::vector<int64_t>&)>& fn) {
  std::vector<int64_t> p(L, 0);
  for (;;) {
    fn(p);
    int64_t l = 0;
    while (l < L && ++p[l] == K) p[l++] = 0;
    if (l == L) return;
  }
}

double path_cost(const Chain& c, const std::vector<int64_t>& p) {
  double s = 0.0;
  for (int64_t l = 0; l < c.L; ++l) s += c.unary[l * c.K + p[l]];
  for (int64_t l = 0; l + 1 < c.L; ++l) s += c.pairwise[(l * c.K + p[l]) * c.K + p[l + 1]];
  return s;
}

double path_resource(const Chain& c, const std::vector<int64_t>& p) {
  double s = 0.0;
  for (int64_t l = 0; l + 1 < c.L; ++l) s += c.resource[(l * c.K + p[l]) * c.K + p[l + 1]];
  return s;
}

void test_viterbi_brute_force() {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t L = 1 + trial % 6, K = 1 + (trial / 6) % 5;
    Chain c = random_chain(rng, L, K, 0.15);
    double best = inf;
    for_each_path(L, K, [&](const std::vector<int64_t>& p) { best = std::min(best, path_cost(c, p)); });
    std::vector<int64_t> path(L);
    std::vector<double> work(viterbi_work_size(L, K));
    const double got = viterbi(c.unary.data(), c.pairwise.data(), L, K, path.data(), work.data());
    SK_EXPECT_NEAR(got, best, 1e-12);
    if (std::isfinite(best)) SK_EXPECT_NEAR(path_cost(c, path), best, 1e-12);
    else SK_EXPECT(path[0] == -1);
  }
}

void test_marginals_brute_force() {
  std::mt19937 rng(2);
  for (double T : {1e-3, 0.1, 1.0, 1e3}) {
    for (int trial = 0; trial < 30; ++trial) {
      const int64_t L = 1 + trial % 5, K = 1 + trial % 4;
      Chain c = random_chain(rng, L, K, 0.1);
      std::vector<double> want(L * K, 0.0);
      // Brute-force softmin with a shift by the minimum, so T = 1e-3 does not underflow.
      double best = inf;
      for_each_path(L, K, [&](const std::vector<int64_t>& p) { best = std::min(best, path_cost(c, p)); });
      if (!std::isfinite(best)) continue;
      double z = 0.0;
      for_each_path(L, K, [&](const std::vector<int64_t>& p) {
        const double w = std::exp(-(path_cost(c, p) - best) / T);
        z += w;
        for (int64_t l = 0; l < L; ++l) want[l * K + p[l]] += w;
      });
      std::vector<double> got(L * K), work(marginals_work_size(L, K));
      const double log_z = viterbi_marginals(c.unary.data(), c.pairwise.data(), L, K, T, got.data(), work.data());
      SK_EXPECT_NEAR(log_z, std::log(z) - best / T, 1e-9 * (1.0 + std::fabs(log_z)));
      for (int64_t i = 0; i < L * K; ++i) SK_EXPECT_NEAR(got[i], want[i] / z, 1e-10);
    }
  }
}

void test_budget_brute_force() {
  std::mt19937 rng(3);
  int checked = 0;
  for (int trial = 0; trial < 100; ++trial) {
    const int64_t L = 2 + trial % 4, K = 2 + trial % 3;
    Chain c = random_chain(rng, L, K, 0.05);
    double rmin = inf, rmax = 0.0;
    for_each_path(L, K, [&](const std::vector<int64_t>& p) {
      if (std::isfinite(path_cost(c, p))) rmin = std::min(rmin, path_resource(c, p)), rmax = std::max(rmax, path_resource(c, p));
    });
    if (!std::isfinite(rmin)) continue;
    const double budget = rmin + 0.4 * (rmax - rmin);
    std::vector<int64_t> path(L);
    BudgetResult r = viterbi_budget(c.unary.data(), c.pairwise.data(), c.resource.data(), L, K, budget, 60, path.data());
    SK_EXPECT(r.status == kBudgetOk);
    SK_EXPECT(r.resource <= budget);
    SK_EXPECT_NEAR(r.cost, path_cost(c, path), 1e-12);
    SK_EXPECT_NEAR(r.resource, path_resource(c, path), 1e-12);
    // The path is a minimiser of cost + gamma * resource ...
    double lag = inf;
    for_each_path(L, K, [&](const std::vector<int64_t>& p) { lag = std::min(lag, path_cost(c, p) + r.gamma * path_resource(c, p)); });
    SK_EXPECT_NEAR(r.cost + r.gamma * r.resource, lag, 1e-9);
    // ... hence the cheapest path among those using at most r.resource.
    double best_in_band = inf;
    for_each_path(L, K, [&](const std::vector<int64_t>& p) {
      const double rp = path_resource(c, p);
      if (rp <= r.resource + 1e-12) best_in_band = std::min(best_in_band, path_cost(c, p));
    });
    SK_EXPECT(r.cost <= best_in_band + 1e-9);
    ++checked;
  }
  SK_EXPECT(checked > 50);
  // Infeasible budget: status says so.
  Chain c = random_chain(rng, 3, 3, 0.0);
  std::vector<int64_t> path(3);
  BudgetResult r = viterbi_budget(c.unary.data(), nullptr, c.resource.data(), 3, 3, -1.0, 30, path.data());
  SK_EXPECT(r.status == kBudgetInfeasible);
}

}  // namespace

int main() {
  test_viterbi_brute_force();
  test_marginals_brute_force();
  test_budget_brute_force();
  return report("test_viterbi");
}
