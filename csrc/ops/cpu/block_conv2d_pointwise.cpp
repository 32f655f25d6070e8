// Per-image GEMMs for 1x1 block_conv2d: see block_conv2d_pointwise.h.
#include "block_conv2d_pointwise.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "block_conv2d_maps.h"
#include "block_conv2d_runs.h"
#include "sgemm.h"

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

// The three products of one (image, block), on row-major operands:
//   forward      out (Co x P) = W (Co x Ci) . x (Ci x P)            [+ out: the bias]
//   grad input   gx  (Ci x P) = W^T (Ci x Co) . go (Co x P)          [+ gx: overlapping windows]
//   grad weight  gw  (Co x Ci) += go (Co x P) . x^T (P x Ci)
// float32 on AVX2 and AVX-512 processors runs our GEMM (sgemm.h: 2x MKL's AVX2 path on AMD
// Zen 5, on par with MKL's AVX-512 path on Intel Sapphire Rapids and ahead of it on the weight
// gradient); everything else calls the BLAS with the same products read column-major.
template <typename T>
bool use_simd() {
  return std::is_same_v<T, float> && have_simd_sgemm();
}

// np pixels of one image; ld* are the row strides (a plane apart for out / go / gx rows).
template <typename T>
void product_forward(int64_t Co, int64_t Ci, int64_t np, const T* w, int64_t ldw, const T* x, int64_t ldx, T beta,
                     T* out, int64_t ldo) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_simd<T>()) return simd_sgemm(Co, np, Ci, w, ldw, 1, x, ldx, beta, out, ldo);
  }
  gemm('N', 'N', np, Co, Ci, T(1), x, ldx, w, ldw, beta, out, ldo);  // out^T = x^T . W^T
}

template <typename T>
void product_grad_input(int64_t Co, int64_t Ci, int64_t np, const T* w, int64_t ldw, const T* go, int64_t ldgo,
                        T beta, T* gx, int64_t ldgx) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_simd<T>()) return simd_sgemm(Ci, np, Co, w, 1, ldw, go, ldgo, beta, gx, ldgx);
  }
  gemm('N', 'T', np, Ci, Co, T(1), go, ldgo, w, ldw, beta, gx, ldgx);  // gx^T = go^T . W
}

// gw is [Co x Ci] row-major.
template <typename T>
void product_grad_weight(int64_t Co, int64_t Ci, int64_t np, const T* go, int64_t ldgo, const T* x, int64_t ldx,
                         T* gw) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_simd<T>()) return simd_sgemm_bt(Co, Ci, np, go, ldgo, 1, x, ldx, 1.0f, gw, Ci);
  }
  gemm('T', 'N', Ci, Co, np, T(1), x, ldx, go, ldgo, T(1), gw, Ci);  // gw^T += x . go^T
}

// Work items are (image, pixel chunk). One chunk per image while the batch covers the threads;
// smaller batches (inference on a few images) split each image's pixels so no thread idles.
struct PixelChunks {
  int64_t per_image, size;
};

PixelChunks pixel_chunks(int64_t N, int64_t P) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t per_image = std::max<int64_t>(1, std::min((threads + N - 1) / N, P / 64));
  const int64_t size = ((P + per_image - 1) / per_image + 15) / 16 * 16;  // whole 16-float vectors
  return {(P + size - 1) / size, size};
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

// Maps of at most 16 pixels (4x4 down to 1x1 at the end of a MobileNet on small inputs): a
// per-image product has rows of P <= 16 floats, at most one AVX-512 vector (oneDNN won by 3x
// below 16), and the weight gradient's depth is P, so C tiles are loaded and stored every 16
// multiply-adds. The batch then goes into one product per (block, task): the block's channel
// window of a task's images is gathered into a [rows x n*P] matrix, image after image,
// multiplied, and the result scattered back to the NCHW planes. The copies move (Ci + Co)
// values per pixel for Ci * Co multiply-adds. On 4x4 maps (ParaDiS blocks of 614 channels,
// batch 64, one thread, fwd+bwd) gathering took the AVX2 path from 149 to 90-104 ms and left
// AVX-512 at 69-75 ms (70.8 per image); on 8x8 the per-image products stay ahead (AVX-512 71
// vs 84-93 ms, AVX2 94 vs 106-109).
constexpr int64_t kGatherMax = 16;

bool gathered(int64_t P) { return P <= kGatherMax && have_simd_sgemm(); }

// The forward takes a task's images a chunk at a time, so that a block's gathered x and its
// product stay in L2 (614 channels x 256 columns: 0.6 MB each) rather than streaming through L3
// once per 128-deep pass. AMD EPYC VM held to AVX2, ParaDiS blocks of 614 channels on 4x4 maps,
// batch 64, min CPU time of 15, 5 interleaved rounds: 1.17x on one thread, 1.11x on two (chunks
// of 512 columns: 1.02x); with AVX-512 1.12x and 1.35x. The backward keeps whole tasks: its
// weight-gradient product, chunked, lost 8-11 % in the same AVX2 runs.
constexpr int64_t kGatherCols = 256;

// m[r, (n - n0) * P + p] = src[n * s0 + r * s1 + p] for r < rows, n0 <= n < n1, p < P.
void gather(const float* src, int64_t s0, int64_t s1, int64_t P, int64_t n0, int64_t n1, int64_t rows, float* m) {
  const int64_t cols = (n1 - n0) * P;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = n0; n < n1; ++n) std::copy_n(src + n * s0 + r * s1, P, m + r * cols + (n - n0) * P);
}

// The inverse: dst[n * s0 + r * s1 + p] = (or +=) m[r, (n - n0) * P + p].
void scatter(const float* m, int64_t s0, int64_t s1, int64_t P, int64_t n0, int64_t n1, int64_t rows, bool add,
             float* dst) {
  const int64_t cols = (n1 - n0) * P;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = n0; n < n1; ++n) {
      const float* from = m + r * cols + (n - n0) * P;
      float* to = dst + n * s0 + r * s1;
      if (add)
        for (int64_t p = 0; p < P; ++p) to[p] += from[p];
      else
        std::copy_n(from, P, to);
    }
}

void forward_gathered(const at::Tensor& x, const at::Tensor& w2, const float* bp, const ConvGeom& G,
                      c10::IntArrayRef offs, at::Tensor& out) {
  const int64_t P = G.H * G.W, xs0 = x.stride(0), xs1 = x.stride(1), ws0 = w2.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = w2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, G.N, images_per_task(G.N), [&](int64_t t0, int64_t t1) {
    std::vector<float> xb, ob;
    const int64_t chunk = std::max<int64_t>(1, kGatherCols / P);
    for (int64_t n0 = t0; n0 < t1; n0 += chunk) {
      const int64_t n1 = std::min(t1, n0 + chunk), cols = (n1 - n0) * P;
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        const int64_t Ci = b.in_size(), Co = b.out_size();
        xb.resize(Ci * cols);
        ob.resize(Co * cols);
        gather(xp + offs[g] * xs1, xs0, xs1, P, n0, n1, Ci, xb.data());
        if (bp)
          for (int64_t o = 0; o < Co; ++o)
            std::fill(ob.data() + o * cols, ob.data() + (o + 1) * cols, bp[b.out_start + o]);
        simd_sgemm(Co, cols, Ci, wp + b.out_start * ws0 + b.in_start, ws0, 1, xb.data(), cols,
                   bp ? 1.0f : 0.0f, ob.data(), cols);
        scatter(ob.data(), G.C_out_total * P, P, P, n0, n1, Co, false, op + pos * P);
        pos += Co;
      }
    }
  });
}

// acc(thread) -> that thread's [Co x Ci] partial weight gradients, block after block.
template <typename Acc>
void backward_gathered(const float* gop, const at::Tensor& x, const at::Tensor& w2, const ConvGeom& G,
                       c10::IntArrayRef offs, const std::vector<char>& add, float* gxp, int64_t gxs0, int64_t gxs1,
                       const std::vector<int64_t>& part_at, const Acc& acc_of) {
  const int64_t P = G.H * G.W, xs0 = x.stride(0), xs1 = x.stride(1), ws0 = w2.stride(0), C = G.C_out_total;
  const float* xp = x.data_ptr<float>();
  const float* wp = w2.data_ptr<float>();
  at::parallel_for(0, G.N, images_per_task(G.N), [&](int64_t n0, int64_t n1) {
    float* acc = acc_of();
    const int64_t cols = (n1 - n0) * P;
    std::vector<float> gob, xb, gxb;
    int64_t pos = 0;
    for (size_t g = 0; g < G.blocks.size(); ++g) {
      const Block& b = G.blocks[g];
      const int64_t Ci = b.in_size(), Co = b.out_size();
      const float* wg = wp + b.out_start * ws0 + b.in_start;
      gob.resize(Co * cols);
      gather(gop + pos * P, C * P, P, P, n0, n1, Co, gob.data());
      if (gxp) {
        gxb.resize(Ci * cols);
        simd_sgemm(Ci, cols, Co, wg, 1, ws0, gob.data(), cols, 0.0f, gxb.data(), cols);
        scatter(gxb.data(), gxs0, gxs1, P, n0, n1, Ci, add[g] != 0, gxp + offs[g] * gxs1);
      }
      if (acc) {
        xb.resize(Ci * cols);
        gather(xp + offs[g] * xs1, xs0, xs1, P, n0, n1, Ci, xb.data());
        simd_sgemm_bt(Co, Ci, cols, gob.data(), cols, 1, xb.data(), cols, 1.0f, acc + part_at[g], Ci);
      }
      pos += Co;
    }
  });
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
  if constexpr (std::is_same_v<T, float>) {
    if (gathered(P)) return forward_gathered(x, w2, bp, G, offs, out);
  }
  const PixelChunks pc = pixel_chunks(G.N, P);
  at::parallel_for(0, G.N * pc.per_image, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / pc.per_image, p0 = item % pc.per_image * pc.size, np = std::min(pc.size, P - p0);
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        T* on = op + (n * G.C_out_total + pos) * P + p0;
        if (bp)
          for (int64_t o = 0; o < b.out_size(); ++o) std::fill(on + o * P, on + o * P + np, bp[b.out_start + o]);
        product_forward(b.out_size(), b.in_size(), np, wp + b.out_start * ws0 + b.in_start, ws0,
                        xp + n * xs0 + offs[g] * xs1 + p0, xs1, bp ? T(1) : T(0), on, P);
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
  const auto acc_of = [&]() -> T* { return pp ? pp + (nested ? 0 : at::get_thread_num()) * part_at.back() : nullptr; };
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (gathered(P)) {
      backward_gathered(gop, x, w2, G, offs, add, gxp, gxs0, gxs1, part_at, acc_of);
      done = true;
    }
  }
  const PixelChunks pc = pixel_chunks(G.N, P);
  if (!done) at::parallel_for(0, G.N * pc.per_image, 1, [&](int64_t i0, int64_t i1) {
    T* acc = acc_of();
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / pc.per_image, p0 = item % pc.per_image * pc.size, np = std::min(pc.size, P - p0);
      int64_t pos = 0;
      for (size_t g = 0; g < G.blocks.size(); ++g) {
        const Block& b = G.blocks[g];
        const T* gon = gop + (n * C + pos) * P + p0;
        const T* wg = wp + b.out_start * ws0 + b.in_start;
        const T* xn = xp + n * xs0 + offs[g] * xs1 + p0;
        if (gxp)
          product_grad_input(b.out_size(), b.in_size(), np, wg, ws0, gon, P, add[g] ? T(1) : T(0),
                             gxp + n * gxs0 + offs[g] * gxs1 + p0, gxs1);
        if (acc) product_grad_weight(b.out_size(), b.in_size(), np, gon, P, xn, xs1, acc + part_at[g]);
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
  if (mask[2]) add_bias_grad(go, G, gb);
}

}  // namespace slimkern::cpu
