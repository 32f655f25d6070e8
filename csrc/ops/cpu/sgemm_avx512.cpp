// AVX-512 float32 GEMM: see sgemm_avx512.h.
//
// Register blocking: a micro-tile of C is 6 rows x 64 columns, 24 zmm accumulators. Per k it
// loads one 64-float row of B (4 zmm) and broadcasts 6 elements of A: 10 loads for 24 FMAs,
// which two FMA pipes retire in 12 cycles. Cache blocking: B is walked in 128 x 64 blocks
// (32 KB, stays in L1) that every 6-row tile of C reuses; A tiles (6 x 128) come from L2.
// B blocks are packed into a contiguous 32 KB panel when enough rows of C reuse them (image
// planes of 2^k floats otherwise alias to a few L1 sets) and always when B is read
// transposed; A is read one broadcast element at a time, so any strides do.
#include "sgemm_avx512.h"

#include <cstdlib>

#include "slimkern/cpu_capability.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SK_AVX512_KERNEL 1
#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
// GCC 12 flags the deliberately undefined source register inside its own set1/maskz
// intrinsics (avx512fintrin.h, __Y) as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define SK_AVX512_KERNEL 0
#endif

namespace slimkern::cpu {

#if SK_AVX512_KERNEL
namespace {

constexpr int kMR = 6;        // rows of a micro-tile
constexpr int kNV = 4;        // 16-float vectors per micro-tile row (64 columns)
constexpr int64_t kKC = 128;  // depth of one pass over a B block
constexpr int64_t kNC = 16 * kNV;  // columns of a B block
constexpr int64_t kPackMinRows = 4 * kMR;  // rows of C that pay for packing a B block

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// C tile (MR x (16 * NV), last vector masked by `last`) (+)= A tile (MR x K) . B block (K x ...).
template <int MR, int NV>
SK_AVX512 void micro(int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
                     bool accumulate, float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a + r * a_si;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(last, bk + 16 * (NV - 1));
    const int64_t ak = k * a_sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ar[r][ak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 val = acc[r][v];
      if (accumulate) val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, cp));
      _mm512_mask_storeu_ps(cp, m, val);
    }
  }
}

template <int MR>
SK_AVX512 void micro_nv(int nv, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
                        bool accumulate, float* c, int64_t ldc, __mmask16 last) {
  switch (nv) {
    case 1: return micro<MR, 1>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 2: return micro<MR, 2>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 3: return micro<MR, 3>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    default: return micro<MR, 4>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  }
}

SK_AVX512 void micro_any(int mr, int nv, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                         int64_t ldb, bool accumulate, float* c, int64_t ldc, __mmask16 last) {
  switch (mr) {
    case 1: return micro_nv<1>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 2: return micro_nv<2>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 3: return micro_nv<3>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 4: return micro_nv<4>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 5: return micro_nv<5>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    default: return micro_nv<6>(nv, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  }
}

// Copies a kc x (16 * nv) block of B (row stride ldb, last vector masked) to rows of kNC.
SK_AVX512 void pack_b(int64_t kc, int nv, const float* b, int64_t ldb, __mmask16 last, float* out) {
  for (int64_t k = 0; k < kc; ++k) {
    for (int v = 0; v < nv - 1; ++v) _mm512_store_ps(out + k * kNC + 16 * v, _mm512_loadu_ps(b + k * ldb + 16 * v));
    _mm512_store_ps(out + k * kNC + 16 * (nv - 1), _mm512_maskz_loadu_ps(last, b + k * ldb + 16 * (nv - 1)));
  }
}

// Transposes the 16 x 16 block at `in` (row stride ld) into `out` (row stride ldo).
SK_AVX512 void transpose16(const float* in, int64_t ld, float* out, int64_t ldo) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ld);
  // Pairs of rows interleaved per 128-bit lane, then pairs of pairs: s[4i + j], lane L, holds
  // column 4L + j of rows 4i .. 4i + 3.
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // Output row 4L + j gathers lane L of s[j], s[4 + j], s[8 + j], s[12 + j].
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(out + (0 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0x88));
    _mm512_storeu_ps(out + (4 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0xDD));
    _mm512_storeu_ps(out + (8 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_storeu_ps(out + (12 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0xDD));
  }
}

// packed[k * kNC + j] = B(k, j) = b[j * ldb + k] for k < kc, j < nj: whole 16 x 16 tiles by
// transpose16, the ragged edges one element at a time.
SK_AVX512 void pack_bt(int64_t kc, int64_t nj, const float* b, int64_t ldb, float* packed) {
  const int64_t k16 = kc - kc % 16, j16 = nj - nj % 16;
  for (int64_t j = 0; j < j16; j += 16)
    for (int64_t k = 0; k < k16; k += 16) transpose16(b + j * ldb + k, ldb, packed + k * kNC + j, kNC);
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t k = j < j16 ? k16 : 0; k < kc; ++k) packed[k * kNC + j] = b[j * ldb + k];
}

// The driver of both layouts. B(k, j) = b[k * ldb + j] (rows of unit stride), or with
// b_transposed b[j * ldb + k] (columns of unit stride: x^T read in place, packed by 16 x 16
// transposes into the same panel layout).
SK_AVX512 void sgemm_driver(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk,
                            const float* b, int64_t ldb, bool b_transposed, float beta, float* c, int64_t ldc) {
  if (K == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = 0.0f;
    return;
  }
  // B rows a power-of-two apart (image planes of 16x16, 32x32 maps) map to a few L1 sets and
  // evict each other; a packed copy of the block stays in L1 for all M / MR row tiles
  // (1.15-1.4x on one core at 32-512 channels). Too few rows do not repay the copy.
  const bool pack = M >= kPackMinRows && ldb > kNC;
  alignas(64) float packed[kKC * kNC];
  for (int64_t j0 = 0; j0 < N; j0 += kNC) {
    const int64_t nj = min64(kNC, N - j0);
    const int nv = static_cast<int>((nj + 15) / 16);
    const __mmask16 last = nj % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (nj % 16)) - 1);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = min64(kKC, K - k0);
      const bool accumulate = k0 > 0 || beta != 0.0f;
      const float* bb = b + k0 * ldb + j0;
      int64_t ldbb = ldb;
      if (b_transposed) {  // always packed: the kernel needs rows of unit stride
        pack_bt(kc, nj, b + j0 * ldb + k0, ldb, packed);
        bb = packed;
        ldbb = kNC;
      } else if (pack) {
        pack_b(kc, nv, bb, ldb, last, packed);
        bb = packed;
        ldbb = kNC;
      }
      for (int64_t i0 = 0; i0 < M; i0 += kMR)
        micro_any(static_cast<int>(min64(kMR, M - i0)), nv, kc, a + i0 * a_si + k0 * a_sk, a_si, a_sk, bb, ldbb,
                  accumulate, c + i0 * ldc + j0, ldc, last);
    }
  }
}

}  // namespace

// The AVX-512 capability in use: the processor has it and SLIMKERN_CPU_CAPABILITY does not
// ask for less.
bool have_avx512_sgemm() { return capability() == Capability::kAvx512; }

void sgemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_driver(M, N, K, a, a_si, a_sk, b, ldb, false, beta, c, ldc);
}

void sgemm_avx512_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_driver(M, N, K, a, a_si, a_sk, b, ldb, true, beta, c, ldc);
}

#else  // no AVX-512 kernel in this build: callers take the BLAS path, these are never reached

bool have_avx512_sgemm() { return false; }
void sgemm_avx512(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*,
                  int64_t) {
  std::abort();
}
void sgemm_avx512_bt(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float,
                     float*, int64_t) {
  std::abort();
}

#endif

}  // namespace slimkern::cpu
