// Per-image GEMMs for 1x1 block_conv2d: see block_conv2d_pointwise.h.
#include "block_conv2d_pointwise.h"

#include <ATen/Parallel.h>

#include <vector>

#include "block_conv2d_runs.h"

// Fortran BLAS, exported by libtorch_cpu (MKL); weak so a build without them still loads.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace slimkern::cpu {
namespace {

// Column-major C (m x n) = alpha * op(A) op(B) + beta * C.
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

// x with contiguous H x W planes and channels at least a plane apart (the GEMMs' leading
// dimension); batch stride arbitrary.
at::Tensor with_contiguous_planes(const at::Tensor& x) {
  const bool ok = (x.stride(3) == 1 || x.size(3) == 1) && (x.stride(2) == x.size(3) || x.size(2) == 1) &&
                  (x.size(1) == 1 || x.stride(1) >= x.size(2) * x.size(3));
  return ok ? x : x.contiguous();
}

// The [C_out, C_in] matrix of a 1x1 weight with unit stride along C_in (a view when the
// parameter is contiguous, which it is in every module; a copy of the whole weight otherwise).
at::Tensor weight_matrix(const at::Tensor& w) {
  at::Tensor m = w.select(3, 0).select(2, 0);
  return m.stride(1) == 1 ? m : m.contiguous();
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& w2, const std::optional<at::Tensor>& bias, const ConvGeom& G,
                  c10::IntArrayRef offs, at::Tensor& out) {
  const int64_t P = G.H * G.W, xs0 = x.stride(0), xs1 = x.stride(1), ws0 = w2.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w2.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const T* bp = has_bias ? bc.data_ptr<T>() : nullptr;
  at::parallel_for(0, G.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        T* on = op + (n * G.C_out_total + pos) * P;
        if (bp)
          for (int64_t o = 0; o < b.out_size(); ++o) std::fill(on + o * P, on + (o + 1) * P, bp[b.out_start + o]);
        // out_n^T (P x Co) = x_n^T (P x Ci) . W^T (Ci x Co), column-major.
        gemm('N', 'N', P, b.out_size(), b.in_size(), T(1), xp + n * xs0 + offs[g] * xs1, xs1,
             wp + b.out_start * ws0 + b.in_start, ws0, bp ? T(1) : T(0), on, P);
        pos += b.out_size();
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w2, const ConvGeom& G,
                   c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw) {
  const int64_t P = G.H * G.W, xs0 = x.stride(0), xs1 = x.stride(1), ws0 = w2.stride(0);
  const int64_t C = G.C_out_total;
  const T* xp = x.data_ptr<T>();
  const T* wp = w2.data_ptr<T>();
  const T* gop = go.data_ptr<T>();
  // Which blocks overwrite their gx window and which add into it (decided once, in block order,
  // which is also the order every image runs them in).
  std::vector<char> add(G.blocks.size(), 0);
  if (mask[0]) {
    GradInputWriter writer(gx);
    for (size_t g = 0; g < G.blocks.size(); ++g) add[g] = writer.begin(offs[g], G.blocks[g].in_size());
    writer.finish();
  }
  // Per-thread partial weight gradients, block after block ([Co x Ci] row-major each).
  std::vector<int64_t> part_at(G.blocks.size() + 1, 0);
  for (size_t g = 0; g < G.blocks.size(); ++g)
    part_at[g + 1] = part_at[g] + G.blocks[g].out_size() * G.blocks[g].in_size();
  // Called from inside a parallel region, parallel_for runs inline on the caller, whose thread
  // number may exceed get_num_threads(): one partial sum then.
  const bool nested = at::in_parallel_region();
  const int64_t threads = nested ? 1 : at::get_num_threads();
  at::Tensor parts = mask[1] ? at::zeros({threads, part_at.back()}, go.options()) : at::Tensor();
  T* pp = mask[1] ? parts.data_ptr<T>() : nullptr;
  T* gxp = mask[0] ? gx.data_ptr<T>() : nullptr;
  const int64_t gxs0 = mask[0] ? gx.stride(0) : 0, gxs1 = mask[0] ? gx.stride(1) : 0;
  at::parallel_for(0, G.N, 1, [&](int64_t n0, int64_t n1) {
    T* acc = pp ? pp + (nested ? 0 : at::get_thread_num()) * part_at.back() : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        const T* gon = gop + (n * C + pos) * P;
        const T* wg = wp + b.out_start * ws0 + b.in_start;
        if (gxp)  // gx_n^T (P x Ci) = go_n^T (P x Co) . W (Co x Ci)
          gemm('N', 'T', P, b.in_size(), b.out_size(), T(1), gon, P, wg, ws0, add[g] ? T(1) : T(0),
               gxp + n * gxs0 + offs[g] * gxs1, gxs1);
        if (acc)  // dW^T (Ci x Co) += x_n (Ci x P) . go_n^T (P x Co)
          gemm('T', 'N', b.in_size(), b.out_size(), P, T(1), xp + n * xs0 + offs[g] * xs1, xs1, gon, P, T(1),
               acc + part_at[g], b.in_size());
        pos += b.out_size();
      }
    }
  });
  if (mask[1]) {
    const at::Tensor total = parts.sum(0);
    for (size_t g = 0; g < G.blocks.size(); ++g) {
      const Block& b = G.blocks[g];
      gw.narrow(0, b.out_start, b.out_size()).narrow(1, b.in_start, b.in_size()).select(3, 0).select(2, 0).add_(
          total.narrow(0, part_at[g], part_at[g + 1] - part_at[g]).view({b.out_size(), b.in_size()}));
    }
  }
}

}  // namespace

bool have_blas_gemm() { return sgemm_ != nullptr && dgemm_ != nullptr; }

at::Tensor pointwise_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const ConvGeom& G, c10::IntArrayRef offs) {
  const at::Tensor x = with_contiguous_planes(x_in);
  const at::Tensor w2 = weight_matrix(weight);
  at::Tensor out = at::empty({G.N, G.C_out_total, G.Ho, G.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_pointwise", [&] {
    forward_impl<scalar_t>(x, w2, bias, G, offs, out);
  });
  return out;
}

void pointwise_backward(const at::Tensor& go, const at::Tensor& x_in, const at::Tensor& weight, const ConvGeom& G,
                        c10::IntArrayRef offs, std::array<bool, 3> mask, at::Tensor& gx, at::Tensor& gw,
                        at::Tensor& gb) {
  const at::Tensor x = with_contiguous_planes(x_in);
  const at::Tensor w2 = weight_matrix(weight);
  if (mask[0] || mask[1]) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_pointwise_backward", [&] {
      backward_impl<scalar_t>(go, x, w2, G, offs, mask, gx, gw);
    });
  }
  if (mask[2]) {
    const at::Tensor sums = go.sum({0, 2, 3});
    int64_t pos = 0;
    for (const auto& b : G.blocks) {
      gb.narrow(0, b.out_start, b.out_size()).add_(sums.narrow(0, pos, b.out_size()));
      pos += b.out_size();
    }
  }
}

}  // namespace slimkern::cpu
