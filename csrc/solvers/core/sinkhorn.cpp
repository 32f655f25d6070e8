// Sinkhorn: log-domain stabilised (absorption) and standard scaling iterations.
#include "sinkhorn.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "simd.h"

namespace slimkern::solvers {
namespace {

constexpr double kTau = 1e50;          // scalings outside [1/kTau, kTau] are absorbed
constexpr double kExpCut = -500.0;     // kernel entries below e^-500 are stored as 0
constexpr double kSumMin = 1e-250;     // kernel sums below this are redone in log space
constexpr double kWarmHeadroom = 200;  // warm-start kernel exponents are capped at this

// One fused pass over the kernel rows: u_i = a_i / (K~ v)_i, then s += u_i K~_i while the
// rows are still in L1, so each iteration reads the n*m kernel once. Rows go four at a
// time: four independent dot products hide the FMA latency and s is loaded and stored
// once per four rows. Stops at the first row that needs care (kernel sum not in
// [smin, DBL_MAX], scaling not in [umin, umax]) and returns its index; n when every row
// went through.
SK_SOLVER_INLINE int64_t fused_rows_body(const double* K, int64_t m, int64_t i, int64_t n, const double* v,
                                         const double* a, double* u, double* s, double smin, double umin,
                                         double umax) {
  auto ok_sum = [&](double t) { return t >= smin && t <= DBL_MAX; };
  auto ok_u = [&](double x) { return x >= umin && x <= umax; };
  while (i < n) {
    if (i + 4 <= n && a[i] > 0.0 && a[i + 1] > 0.0 && a[i + 2] > 0.0 && a[i + 3] > 0.0) {
      const double* r0 = K + i * m;
      const double* r1 = r0 + m;
      const double* r2 = r1 + m;
      const double* r3 = r2 + m;
      double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0;
#pragma omp simd reduction(+ : t0, t1, t2, t3)
      for (int64_t j = 0; j < m; ++j) {
        t0 += r0[j] * v[j];
        t1 += r1[j] * v[j];
        t2 += r2[j] * v[j];
        t3 += r3[j] * v[j];
      }
      if (ok_sum(t0) && ok_sum(t1) && ok_sum(t2) && ok_sum(t3)) {
        const double u0 = a[i] / t0, u1 = a[i + 1] / t1, u2 = a[i + 2] / t2, u3 = a[i + 3] / t3;
        if (ok_u(u0) && ok_u(u1) && ok_u(u2) && ok_u(u3)) {
          u[i] = u0, u[i + 1] = u1, u[i + 2] = u2, u[i + 3] = u3;
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) s[j] += u0 * r0[j] + u1 * r1[j] + u2 * r2[j] + u3 * r3[j];
          i += 4;
          continue;
        }
      }
      // A row of this block needs care: take the block one row at a time below.
    }
    const int64_t stop = std::min(n, i + 4);
    for (; i < stop; ++i) {
      const double ai = a[i];
      if (ai == 0.0) {
        u[i] = 0.0;
        continue;
      }
      const double* row = K + i * m;
      double t = 0.0;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < m; ++j) t += row[j] * v[j];
      if (!ok_sum(t)) return i;
      const double ui = ai / t;
      if (!ok_u(ui)) return i;
      u[i] = ui;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) s[j] += ui * row[j];
    }
  }
  return n;
}

int64_t fused_rows(const double* K, int64_t m, int64_t i, int64_t n, const double* v, const double* a, double* u,
                   double* s, double smin, double umin, double umax) {
  int64_t stop = n;
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA { stop = fused_rows_body(K, m, i, n, v, a, u, s, smin, umin, umax); });
  return stop;
}

double row_dot(const double* row, const double* v, int64_t m) {
  double dot = 0.0;
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA {
    double t = 0.0;
#pragma omp simd reduction(+ : t)
    for (int64_t j = 0; j < m; ++j) t += row[j] * v[j];
    dot = t;
  });
  return dot;
}

void axpy(double alpha, const double* x, double* y, int64_t m) {
  cpu::run_vectorized([&]() SK_INLINE_LAMBDA {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) y[j] += alpha * x[j];
  });
}

inline double kernel_entry(double e) { return e < kExpCut ? 0.0 : std::exp(e); }

class Solver {
 public:
  Solver(const double* a, const double* b, const double* M, int64_t n, int64_t m,
         const SinkhornOptions& opt, double* K)
      : a_(a), b_(b), M_(M), n_(n), m_(m), opt_(opt), inv_reg_(1.0 / opt.reg), K_(K),
        f_(n, 0.0), g_(m, 0.0), u_(n), v_(m), s_(m), lu_(n), lv_(m), tmp_(std::max(n, m)) {}

  SinkhornResult run(bool warm, double* log_u, double* log_v) {
    const bool log_method = opt_.method == SinkhornMethod::kLog;
    init(warm, log_u, log_v, log_method);
    column_sums();
    std::vector<double> u_prev, v_prev;
    if (!log_method) u_prev.resize(n_), v_prev.resize(m_);
    const int64_t every = std::max<int64_t>(1, opt_.check_every);
    int64_t it = 0;
    for (;; ++it) {
      if (it == opt_.max_iter || it % every == 0) {
        res_.err = marginal_error();
        if (res_.err <= opt_.tol) {
          res_.status = kSinkhornConverged;
          break;
        }
        if (it == opt_.max_iter) {
          res_.status = kSinkhornMaxIter;
          break;
        }
      }
      if (log_method) {
        update_v_log();
        update_u_log();
      } else {
        std::copy(u_.begin(), u_.end(), u_prev.begin());
        std::copy(v_.begin(), v_.end(), v_prev.begin());
        if (!update_v_standard() || !update_u_standard()) {
          u_.swap(u_prev);
          v_.swap(v_prev);
          column_sums();
          res_.err = marginal_error();
          res_.status = kSinkhornNumerical;
          break;
        }
      }
    }
    res_.n_iter = it;
    finish(log_u, log_v);
    return res_;
  }

 private:
  bool live_row(int64_t i) const { return a_[i] > 0.0; }
  bool live_col(int64_t j) const { return b_[j] > 0.0; }
  double cost(int64_t i, int64_t j) const { return M_[i * m_ + j] * inv_reg_; }

  void init(bool warm, const double* log_u, const double* log_v, bool log_method) {
    if (!log_method) {
      // Plain scaling: K = exp(-M / reg); a warm start enters through u, v.
      for (int64_t i = 0; i < n_; ++i) u_[i] = live_row(i) ? (warm ? std::exp(log_u[i]) : 1.0) : 0.0;
      for (int64_t j = 0; j < m_; ++j) v_[j] = live_col(j) ? (warm ? std::exp(log_v[j]) : 1.0) : 0.0;
      for (int64_t k = 0; k < n_ * m_; ++k) K_[k] = std::exp(-M_[k] * inv_reg_);
      return;
    }
    // Potentials with every kernel exponent <= 0 and a 0 in each row and column, so no
    // row or column starts underflowed whatever reg is (a c-transform pair of -M / reg).
    if (warm) {
      for (int64_t i = 0; i < n_; ++i) f_[i] = live_row(i) ? log_u[i] : 0.0;
    } else {
      for (int64_t i = 0; i < n_; ++i) {
        double mn = kInf;
        for (int64_t j = 0; j < m_; ++j)
          if (live_col(j)) mn = std::min(mn, cost(i, j));
        f_[i] = live_row(i) ? mn : 0.0;
      }
    }
    std::fill(g_.begin(), g_.end(), kInf);
    for (int64_t i = 0; i < n_; ++i) {
      if (!live_row(i)) continue;
      for (int64_t j = 0; j < m_; ++j) g_[j] = std::min(g_[j], cost(i, j) - f_[i]);
    }
    for (int64_t j = 0; j < m_; ++j) {
      if (!live_col(j)) g_[j] = 0.0;
      else if (warm) g_[j] = std::min(log_v[j], g_[j] + kWarmHeadroom);
    }
    for (int64_t i = 0; i < n_; ++i) u_[i] = live_row(i) ? 1.0 : 0.0;
    for (int64_t j = 0; j < m_; ++j) v_[j] = live_col(j) ? 1.0 : 0.0;
    for (int64_t i = 0; i < n_; ++i) fill_row(i);
  }

  void fill_row(int64_t i) {
    double* row = K_ + i * m_;
    const double* c = M_ + i * m_;
    const double fi = f_[i];
    for (int64_t j = 0; j < m_; ++j) row[j] = kernel_entry(fi + g_[j] - c[j] * inv_reg_);
  }

  void fill_col(int64_t j) {
    const double gj = g_[j];
    for (int64_t i = 0; i < n_; ++i) K_[i * m_ + j] = kernel_entry(f_[i] + gj - cost(i, j));
  }

  void column_sums() {
    std::fill(s_.begin(), s_.end(), 0.0);
    for (int64_t i = 0; i < n_; ++i)
      if (u_[i] != 0.0) axpy(u_[i], K_ + i * m_, s_.data(), m_);
  }

  double marginal_error() const {
    double e = 0.0;
    for (int64_t j = 0; j < m_; ++j) e += std::fabs(v_[j] * s_[j] - b_[j]);
    return e;
  }

  void update_v_log() {
    bool lu_ready = false;
    for (int64_t j = 0; j < m_; ++j) {
      if (!live_col(j)) continue;
      const double sj = s_[j];
      if (!(sj >= kSumMin && sj <= DBL_MAX)) {
        // Exact column update in log space: g_j = log b_j - LSE_i(f_i + log u_i - M_ij / reg).
        if (!lu_ready) {
          for (int64_t i = 0; i < n_; ++i) lu_[i] = u_[i] > 0.0 ? f_[i] + std::log(u_[i]) : -kInf;
          lu_ready = true;
        }
        for (int64_t i = 0; i < n_; ++i) tmp_[i] = lu_[i] - cost(i, j);
        g_[j] = std::log(b_[j]) - log_sum_exp(tmp_.data(), n_);
        v_[j] = 1.0;
        fill_col(j);
        ++res_.n_exact;
        continue;
      }
      const double vj = b_[j] / sj;
      if (vj > kTau || vj < 1.0 / kTau) {
        g_[j] += std::log(vj);
        v_[j] = 1.0;
        fill_col(j);
        ++res_.n_absorb;
      } else {
        v_[j] = vj;
      }
    }
  }

  void update_u_log() {
    std::fill(s_.begin(), s_.end(), 0.0);
    bool lv_ready = false;
    for (int64_t i = 0;;) {
      i = fused_rows(K_, m_, i, n_, v_.data(), a_, u_.data(), s_.data(), kSumMin, 1.0 / kTau, kTau);
      if (i == n_) break;
      double* row = K_ + i * m_;
      const double t = row_dot(row, v_.data(), m_);
      if (!(t >= kSumMin && t <= DBL_MAX)) {
        // Exact row update: f_i = log a_i - LSE_j(g_j + log v_j - M_ij / reg).
        if (!lv_ready) {
          for (int64_t j = 0; j < m_; ++j) lv_[j] = v_[j] > 0.0 ? g_[j] + std::log(v_[j]) : -kInf;
          lv_ready = true;
        }
        for (int64_t j = 0; j < m_; ++j) tmp_[j] = lv_[j] - cost(i, j);
        f_[i] = std::log(a_[i]) - log_sum_exp(tmp_.data(), m_);
        ++res_.n_exact;
      } else {
        f_[i] += std::log(a_[i] / t);
        ++res_.n_absorb;
      }
      u_[i] = 1.0;
      fill_row(i);
      axpy(1.0, row, s_.data(), m_);
      ++i;
    }
  }

  bool update_v_standard() {
    for (int64_t j = 0; j < m_; ++j) {
      if (!live_col(j)) continue;
      const double vj = b_[j] / s_[j];
      if (!(s_[j] > 0.0) || !(vj <= DBL_MAX)) return false;
      v_[j] = vj;
    }
    return true;
  }

  bool update_u_standard() {
    std::fill(s_.begin(), s_.end(), 0.0);
    return fused_rows(K_, m_, 0, n_, v_.data(), a_, u_.data(), s_.data(), DBL_MIN, 0.0, DBL_MAX) == n_;
  }

  void finish(double* log_u, double* log_v) {
    for (int64_t i = 0; i < n_; ++i) {
      double* row = K_ + i * m_;
      const double ui = u_[i];
      for (int64_t j = 0; j < m_; ++j) row[j] *= ui * v_[j];
      log_u[i] = ui > 0.0 ? f_[i] + std::log(ui) : -kInf;
    }
    for (int64_t j = 0; j < m_; ++j) log_v[j] = v_[j] > 0.0 ? g_[j] + std::log(v_[j]) : -kInf;
  }

  const double *a_, *b_, *M_;
  int64_t n_, m_;
  SinkhornOptions opt_;
  double inv_reg_;
  double* K_;
  std::vector<double> f_, g_, u_, v_, s_, lu_, lv_, tmp_;
  SinkhornResult res_;
};

}  // namespace

SinkhornResult sinkhorn(const double* a, const double* b, const double* M, int64_t n, int64_t m,
                        const SinkhornOptions& opt, bool warm, double* log_u, double* log_v,
                        double* plan) {
  FlushDenormals ftz;
  Solver solver(a, b, M, n, m, opt, plan);
  return solver.run(warm, log_u, log_v);
}

void sinkhorn_batch(const double* a, const double* b, const double* M, int64_t B, int64_t n,
                    int64_t m, const SinkhornOptions& opt, bool warm, double* log_u, double* log_v,
                    double* plan, SinkhornResult* results) {
  // Threads pay off once a problem is more than a few tens of microseconds.
  const bool par = B > 1 && n * m * std::max<int64_t>(opt.max_iter, 1) > (int64_t{1} << 16);
#pragma omp parallel for schedule(dynamic) if (par)
  for (int64_t p = 0; p < B; ++p)
    results[p] = sinkhorn(a + p * n, b + p * m, M + p * n * m, n, m, opt, warm, log_u + p * n,
                          log_v + p * m, plan + p * n * m);
}

}  // namespace slimkern::solvers
