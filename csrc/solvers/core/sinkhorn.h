// Entropic optimal transport (Sinkhorn-Knopp) in plain C++ (no torch).
//
// Solves  min_P <P, M> - reg * H(P)  s.t.  P 1 = a, P^T 1 = b,  whose solution is
// P_ij = exp(log_u_i - M_ij / reg + log_v_j)  (Cuturi, NeurIPS 2013). log_u / log_v use
// POT's convention (ot.sinkhorn(..., log=True)["log_u"]), so they round-trip as warm starts.
//
// kLog: the log-domain stabilised iteration of Schmitzer (SIAM J. Sci. Comput. 2019):
//   scalings u, v multiply a kernel K~_ij = exp(f_i + g_j - M_ij / reg) whose potentials f, g
//   absorb u, v (row by row, column by column) whenever a scaling leaves [1e-50, 1e50];
//   a row or column whose kernel sum underflows is updated exactly by a log-sum-exp. It
//   reaches the same fixed point as the pure log-domain iteration (POT's sinkhorn_log)
//   with matrix-vector products instead of n*m exponentials per iteration, and stays
//   finite for reg down to 1e-4 on costs in [0, 1].
// kStandard: the plain scaling iteration u = a / (K v), v = b / (K^T u), K = exp(-M / reg);
//   it under/overflows for small reg (reported as kSinkhornNumerical).
//
// One iteration = a v-update then a u-update (rows then match a exactly). err is the L1
// marginal violation sum_j |(P^T 1)_j - b_j| of the returned plan.
#pragma once

#include <cstdint>

namespace slimkern::solvers {

enum class SinkhornMethod : int { kLog = 0, kStandard = 1 };

enum SinkhornStatus : int {
  kSinkhornConverged = 0,  // err <= tol at a check
  kSinkhornMaxIter = 1,    // max_iter iterations without reaching tol
  kSinkhornNumerical = 2,  // standard method under/overflowed; the last finite iterate is returned
};

struct SinkhornOptions {
  double reg = 1.0;
  SinkhornMethod method = SinkhornMethod::kLog;
  int64_t max_iter = 1000;
  double tol = 1e-9;        // stop when err <= tol (tol <= 0 runs max_iter iterations)
  int64_t check_every = 1;  // test err every k iterations (free here: it reuses K^T u)
};

struct SinkhornResult {
  int64_t n_iter = 0;   // iterations performed
  double err = 0.0;     // marginal violation of the returned plan
  int status = kSinkhornConverged;
  int64_t n_absorb = 0; // rows/columns whose scaling was absorbed into the kernel
  int64_t n_exact = 0;  // rows/columns updated by an exact log-sum-exp (underflow)
};

// a [n], b [m] nonnegative histograms of equal mass, M [n, m] finite costs (row-major).
// plan [n, m] is written (it also serves as the kernel's storage while solving).
// log_u [n], log_v [m]: read as a warm start when warm is true; written on return.
SinkhornResult sinkhorn(const double* a, const double* b, const double* M, int64_t n, int64_t m,
                        const SinkhornOptions& opt, bool warm, double* log_u, double* log_v,
                        double* plan);

// B independent problems, contiguous: a [B, n], b [B, m], M [B, n, m]; OpenMP over B.
void sinkhorn_batch(const double* a, const double* b, const double* M, int64_t B, int64_t n,
                    int64_t m, const SinkhornOptions& opt, bool warm, double* log_u, double* log_v,
                    double* plan, SinkhornResult* results);

}  // namespace slimkern::solvers
