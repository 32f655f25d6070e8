// Unit tests of the Sinkhorn core against a plain log-domain reference iteration.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../core/sinkhorn.h"
#include "check.h"

using namespace slimkern::solvers;

namespace {

struct Problem {
  int64_t n, m;
  std::vector<double> a, b, M;
};

Problem random_problem(std::mt19937& rng, int64_t n, int64_t m, bool zeros = false) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  Problem p{n, m, std::vector<double>(n), std::vector<double>(m), std::vector<double>(n * m)};
  for (auto& x : p.a) x = 0.1 + u01(rng);
  for (auto& x : p.b) x = 0.1 + u01(rng);
  if (zeros) p.a[0] = 0.0, p.b[m - 1] = 0.0;
  double sa = 0, sb = 0;
  for (double x : p.a) sa += x;
  for (double x : p.b) sb += x;
  for (auto& x : p.a) x /= sa;
  for (auto& x : p.b) x /= sb;
  for (auto& x : p.M) x = u01(rng);
  return p;
}

double lse(const std::vector<double>& x) {
  double mx = -INFINITY;
  for (double v : x) mx = std::max(mx, v);
  if (mx == -INFINITY) return mx;
  double s = 0;
  for (double v : x) s += std::exp(v - mx);
  return mx + std::log(s);
}

// POT's sinkhorn_log iteration, run for a fixed number of iterations.
std::vector<double> reference_plan(const Problem& p, double reg, int iters) {
  std::vector<double> lu(p.n, 0.0), lv(p.m, 0.0), t;
  for (int it = 0; it < iters; ++it) {
    for (int64_t j = 0; j < p.m; ++j) {
      t.assign(p.n, 0.0);
      for (int64_t i = 0; i < p.n; ++i) t[i] = lu[i] - p.M[i * p.m + j] / reg;
      lv[j] = std::log(p.b[j]) - lse(t);
    }
    for (int64_t i = 0; i < p.n; ++i) {
      t.assign(p.m, 0.0);
      for (int64_t j = 0; j < p.m; ++j) t[j] = lv[j] - p.M[i * p.m + j] / reg;
      lu[i] = std::log(p.a[i]) - lse(t);
    }
  }
  std::vector<double> plan(p.n * p.m);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.m; ++j) plan[i * p.m + j] = std::exp(lu[i] + lv[j] - p.M[i * p.m + j] / reg);
  return plan;
}

struct Solved {
  std::vector<double> plan, lu, lv;
  SinkhornResult r;
};

Solved solve(const Problem& p, SinkhornOptions opt, const Solved* warm = nullptr) {
  Solved s{std::vector<double>(p.n * p.m), std::vector<double>(p.n), std::vector<double>(p.m), {}};
  if (warm) s.lu = warm->lu, s.lv = warm->lv;
  s.r = sinkhorn(p.a.data(), p.b.data(), p.M.data(), p.n, p.m, opt, warm != nullptr, s.lu.data(), s.lv.data(), s.plan.data());
  return s;
}

void test_matches_log_reference() {
  std::mt19937 rng(4);
  for (auto [n, m, reg] : {std::tuple{5, 7, 0.1}, std::tuple{12, 9, 0.05}, std::tuple{20, 20, 0.02}}) {
    Problem p = random_problem(rng, n, m);
    SinkhornOptions opt;
    opt.reg = reg;
    opt.tol = 1e-13;
    opt.max_iter = 20000;
    Solved s = solve(p, opt);
    SK_EXPECT(s.r.status == kSinkhornConverged);
    std::vector<double> want = reference_plan(p, reg, 20000);
    for (int64_t k = 0; k < n * m; ++k) SK_EXPECT_NEAR(s.plan[k], want[k], 1e-10);
    // The plan is exp(log_u + log_v - M / reg).
    SK_EXPECT_NEAR(s.plan[m + 1], std::exp(s.lu[1] + s.lv[1] - p.M[m + 1] / reg), 1e-12);
    // Standard scaling reaches the same plan when reg is large enough for it.
    opt.method = SinkhornMethod::kStandard;
    Solved st = solve(p, opt);
    SK_EXPECT(st.r.status == kSinkhornConverged);
    for (int64_t k = 0; k < n * m; ++k) SK_EXPECT_NEAR(st.plan[k], want[k], 1e-10);
    // A warm start from the solution is already converged.
    opt.method = SinkhornMethod::kLog;
    opt.tol = 1e-11;
    Solved w = solve(p, opt, &s);
    SK_EXPECT(w.r.n_iter <= 1);
  }
}

void test_small_reg_stays_finite() {
  std::mt19937 rng(5);
  Problem p = random_problem(rng, 30, 40);
  // Row 0 costs >= 0.8: exp(-M / reg) underflows to 0 there for reg <= 1e-3.
  for (int64_t j = 0; j < p.m; ++j) p.M[j] = 0.8 + 0.2 * p.M[j];
  for (double reg : {1e-3, 1e-4}) {
    SinkhornOptions opt;
    opt.reg = reg;
    opt.max_iter = 3000;
    opt.tol = 1e-6;
    Solved s = solve(p, opt);
    bool finite = true;
    for (double x : s.plan) finite = finite && std::isfinite(x) && x >= 0.0;
    SK_EXPECT(finite);
    SK_EXPECT(std::isfinite(s.r.err));
    // reg = 1e-4 converges slowly (as for any Sinkhorn) but moves steadily towards b.
    SK_EXPECT(s.r.err < (reg < 1e-3 ? 0.1 : 1e-6));
    for (int64_t i = 0; i < p.n; ++i) {  // rows match a after every u-update
      double row = 0;
      for (int64_t j = 0; j < p.m; ++j) row += s.plan[i * p.m + j];
      SK_EXPECT_NEAR(row, p.a[i], 1e-9);
    }
    opt.method = SinkhornMethod::kStandard;
    Solved st = solve(p, opt);
    SK_EXPECT(st.r.status == kSinkhornNumerical);
  }
}

void test_underflowing_warm_start_is_recovered() {
  // A warm start whose kernel underflows everywhere forces the exact log-sum-exp updates.
  std::mt19937 rng(7);
  Problem p = random_problem(rng, 9, 11);
  SinkhornOptions opt;
  opt.reg = 0.05;
  opt.tol = 1e-12;
  opt.max_iter = 20000;
  Solved cold = solve(p, opt);
  Solved bad{{}, std::vector<double>(p.n, 0.0), std::vector<double>(p.m, -5000.0), {}};
  Solved w = solve(p, opt, &bad);
  SK_EXPECT(w.r.n_exact > 0);
  SK_EXPECT(w.r.status == kSinkhornConverged);
  for (int64_t k = 0; k < p.n * p.m; ++k) SK_EXPECT_NEAR(w.plan[k], cold.plan[k], 1e-10);
}

void test_zero_entries_and_batch() {
  std::mt19937 rng(6);
  const int64_t B = 5, n = 6, m = 8;
  std::vector<Problem> ps;
  std::vector<double> a, b, M;
  for (int64_t k = 0; k < B; ++k) {
    ps.push_back(random_problem(rng, n, m, k == 2));
    a.insert(a.end(), ps.back().a.begin(), ps.back().a.end());
    b.insert(b.end(), ps.back().b.begin(), ps.back().b.end());
    M.insert(M.end(), ps.back().M.begin(), ps.back().M.end());
  }
  SinkhornOptions opt;
  opt.reg = 0.05;
  std::vector<double> plan(B * n * m), lu(B * n), lv(B * m);
  std::vector<SinkhornResult> rs(B);
  sinkhorn_batch(a.data(), b.data(), M.data(), B, n, m, opt, false, lu.data(), lv.data(), plan.data(), rs.data());
  for (int64_t k = 0; k < B; ++k) {
    Solved s = solve(ps[k], opt);
    SK_EXPECT(rs[k].n_iter == s.r.n_iter);
    for (int64_t q = 0; q < n * m; ++q) SK_EXPECT(plan[k * n * m + q] == s.plan[q]);
  }
  // Zero-mass row and column carry no transport.
  for (int64_t j = 0; j < m; ++j) SK_EXPECT(plan[2 * n * m + j] == 0.0);
  for (int64_t i = 0; i < n; ++i) SK_EXPECT(plan[2 * n * m + i * m + m - 1] == 0.0);
  SK_EXPECT(rs[2].status == kSinkhornConverged);
}

}  // namespace

int main() {
  test_matches_log_reference();
  test_small_reg_stays_finite();
  test_zero_entries_and_batch();
  test_underflowing_warm_start_is_recovered();
  return report("test_sinkhorn");
}
