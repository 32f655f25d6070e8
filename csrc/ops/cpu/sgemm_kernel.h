// The float32 GEMM of sgemm.h, written once over `Vec` (vec_avx512.h / vec_avx2.h) and compiled
// once per instruction set: each ISA file sets its target pragma, defines SK_GEMM_ISA (its
// namespace), kGemmNV (vectors per micro-tile row), kGemmPackA (whether long products pack A)
// and its Vec there, then includes this.
// No include guard on purpose; no includes either (see sgemm.h on ATen).
//
// Register blocking: a micro-tile of C is 6 rows x NV vectors (AVX-512: 6 x 64 floats in 24 of
// the 32 zmm; AVX2: 6 x 16 in 12 of the 16 ymm). Per k it loads one tile row of B and
// broadcasts 6 elements of A: (NV + 6) loads for 6 NV FMAs. Cache blocking: B is walked in
// kKC x kNC panels (128 x 64 floats, 32 KB) that every 6-row tile of C reuses; A tiles
// (6 x 128) come from L2. A panel is packed into a contiguous buffer, micro-panel major, when
// enough rows of C reuse it (image planes of 2^k floats otherwise alias to a few L1 sets) and
// always when B is read transposed; A is read one broadcast element at a time, so any strides
// do, and on AVX2 long products pack it into row tiles first (see driver).

namespace slimkern::cpu::SK_GEMM_ISA {
namespace {

constexpr int kL = Vec::L;
constexpr int kMR = 6;
constexpr int kNV = kGemmNV;
constexpr int64_t kTW = kL * kNV;          // columns of a micro-tile
constexpr int64_t kKC = 128;               // depth of one pass over a B panel
constexpr int64_t kNC = 64;                // columns of a B panel (a multiple of kTW)
constexpr int64_t kPackMinRows = 4 * kMR;  // rows of C that pay for packing a B panel
static_assert(kNC % kTW == 0, "a B panel holds whole micro-tiles");

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// An owned heap array of floats. Not a std container: its inline code would be compiled for
// this ISA and could be picked by the linker for every caller (sgemm.h).
struct FloatBuffer {
  explicit FloatBuffer(int64_t n) : p(new float[n]) {}
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;
  ~FloatBuffer() { delete[] p; }
  float* const p;
};

// C tile (MR x NV vectors) (+)= A tile (MR x K) . B (K x NV vectors). FULL: every vector
// whole; otherwise the last one holds the lanes of `last` only (masked loads and stores).
template <int MR, int NV, bool FULL>
void micro(int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb, bool accumulate,
           float* c, int64_t ldc, typename Vec::M last) {
  using V = typename Vec::V;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  const float* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a + r * a_si;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = FULL || v < NV - 1 ? Vec::loadu(bk + kL * v) : Vec::load(last, bk + kL * v);
    const int64_t ak = k * a_sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av = Vec::set1(ar[r][ak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + kL * v;
      if (FULL || v < NV - 1) {
        Vec::store_all(cp, accumulate ? Vec::add(acc[r][v], Vec::loadu(cp)) : acc[r][v]);
      } else {
        Vec::store(cp, last, accumulate ? Vec::add(acc[r][v], Vec::load(last, cp)) : acc[r][v]);
      }
    }
  }
}

template <int MR, int NV>
void micro_full(bool full, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
                bool accumulate, float* c, int64_t ldc, typename Vec::M last) {
  if (full) return micro<MR, NV, true>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  micro<MR, NV, false>(K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
}

template <int MR>
void micro_nv(int nv, bool full, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
              int64_t ldb, bool accumulate, float* c, int64_t ldc, typename Vec::M last) {
  if constexpr (kNV >= 4) {
    if (nv >= 4) return micro_full<MR, 4>(full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    if (nv == 3) return micro_full<MR, 3>(full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  }
  if (nv >= 2) return micro_full<MR, 2>(full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  micro_full<MR, 1>(full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
}

void micro_any(int mr, int nv, bool full, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
               int64_t ldb, bool accumulate, float* c, int64_t ldc, typename Vec::M last) {
  switch (mr) {
    case 1: return micro_nv<1>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 2: return micro_nv<2>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 3: return micro_nv<3>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 4: return micro_nv<4>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    case 5: return micro_nv<5>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
    default: return micro_nv<6>(nv, full, K, a, a_si, a_sk, b, ldb, accumulate, c, ldc, last);
  }
}

// A packed B panel is micro-panel major: the kTW columns of one micro-tile are contiguous for
// each k, so the micro-kernel walks one dense block (kc x kTW). With rows of the whole panel
// (kNC floats, 256 bytes) an AVX2 micro-tile read one 64-byte line every 256 bytes, a quarter
// of the L1 sets, where the A stream evicted it.
inline int64_t packed_at(int64_t k, int64_t j) { return j / kTW * (kKC * kTW) + k * kTW + j % kTW; }

// Copies a kc x nj block of B (row stride ldb) into the packed layout, zero-filling the last
// vector past nj.
void pack_b(int64_t kc, int64_t nj, const float* b, int64_t ldb, float* out) {
  const int64_t whole = nj / kL;
  const auto last = Vec::first(nj - whole * kL);
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t v = 0; v < whole; ++v) Vec::store_all(out + packed_at(k, kL * v), Vec::loadu(b + k * ldb + kL * v));
    if (whole * kL < nj) Vec::store_all(out + packed_at(k, kL * whole), Vec::load(last, b + k * ldb + kL * whole));
  }
}

// packed_at(k, j) <- B(k, j) = b[j * ldb + k] for k < kc, j < nj: whole L x L tiles by
// Vec::transpose (an L-column group never straddles two micro-panels), the ragged edges one
// element at a time.
void pack_bt(int64_t kc, int64_t nj, const float* b, int64_t ldb, float* packed) {
  const int64_t kw = kc - kc % kL, jw = nj - nj % kL;
  for (int64_t j = 0; j < jw; j += kL)
    for (int64_t k = 0; k < kw; k += kL) Vec::transpose(b + j * ldb + k, ldb, packed + packed_at(k, j), kTW);
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t k = j < jw ? kw : 0; k < kc; ++k) packed[packed_at(k, j)] = b[j * ldb + k];
}

// Copies A(i, k) for i < M, k < kc into row tiles of kMR: tile t holds A(t kMR + r, k) at
// out[t kMR kc + k kMR + r], rows past M zero.
void pack_a(int64_t M, int64_t kc, const float* a, int64_t a_si, int64_t a_sk, float* out) {
  for (int64_t i0 = 0; i0 < M; i0 += kMR) {
    const int64_t mr = min64(kMR, M - i0);
    float* t = out + i0 * kc;
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t r = 0; r < kMR; ++r) t[k * kMR + r] = r < mr ? a[(i0 + r) * a_si + k * a_sk] : 0.0f;
  }
}

// The driver of both layouts (sgemm.h): B(k, j) = b[k * ldb + j], or with b_transposed
// b[j * ldb + k] (x^T read in place, packed by L x L transposes into the same panel layout).
void driver(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
            int64_t ldb, bool b_transposed, float beta, float* c, int64_t ldc) {
  if (K == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = 0.0f;
    return;
  }
  // B rows a power-of-two apart (image planes of 16x16, 32x32 maps) map to a few L1 sets and
  // evict each other; a packed copy of the panel stays in L1 for all M / MR row tiles
  // (1.15-1.4x on one AVX-512 core at 32-512 channels). Too few rows do not repay the copy.
  const bool pack = M >= kPackMinRows && ldb > kNC;
  alignas(64) float packed[kKC * kNC];
  // C[:, j0 : j0 + nj] (+)= A[:, k0 : k0 + kc] . B[k0 : k0 + kc, j0 : j0 + nj]; row tile i0 of A
  // at ap + i0 * tsi, with strides (si, sk).
  const auto panel = [&](int64_t k0, int64_t kc, int64_t j0, const float* ap, int64_t tsi, int64_t si, int64_t sk) {
    const int64_t nj = min64(kNC, N - j0);
    const bool accumulate = k0 > 0 || beta != 0.0f;
    const bool packed_b = b_transposed || pack;  // transposed: the micro-kernel needs rows of unit stride
    if (b_transposed)
      pack_bt(kc, nj, b + j0 * ldb + k0, ldb, packed);
    else if (pack)
      pack_b(kc, nj, b + k0 * ldb + j0, ldb, packed);
    // Micro-tile columns outside, rows inside: the tile's slice of the panel stays in L1.
    for (int64_t jt = 0; jt < nj; jt += kTW) {
      const int64_t cols = min64(kTW, nj - jt);
      const int nv = static_cast<int>((cols + kL - 1) / kL);
      const bool full = cols % kL == 0;
      const auto last = Vec::first(cols - (nv - 1) * kL);
      const float* bt = packed_b ? packed + packed_at(0, jt) : b + k0 * ldb + j0 + jt;
      const int64_t ldbt = packed_b ? kTW : ldb;
      for (int64_t i0 = 0; i0 < M; i0 += kMR)
        micro_any(static_cast<int>(min64(kMR, M - i0)), nv, full, kc, ap + i0 * tsi, si, sk, bt, ldbt, accumulate,
                  c + i0 * ldc + j0 + jt, ldc, last);
    }
  };
  // A row tile read in place is kMR strided streams of broadcasts (kMR rows of W apart; for the
  // input gradient kMR elements of a W column, a whole row apart per k). Packed it is one
  // contiguous stream: depth passes then run outermost so that one packed panel of A serves all
  // N columns, which repays its copy when N is long. On one AVX2 core (AMD EPYC VM held to AVX2,
  // 1x1 conv of 614 channels on 4x4 maps, batch 64, min of 9, interleaved runs) packing A gave
  // 1.08-1.14x on top of the micro-panel layout of B; the AVX-512 build, whose 6 x 64 tiles do 4
  // FMAs per broadcast, lost 8-12 % to the copy and reads A in place. Otherwise column panels
  // run outermost and keep their C block in L2 across the depth passes.
  if (kGemmPackA && N >= 512 && M >= kMR) {
    const FloatBuffer apack((M + kMR - 1) / kMR * kMR * kKC);
    float* ap = apack.p;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = min64(kKC, K - k0);
      pack_a(M, kc, a + k0 * a_sk, a_si, a_sk, ap);
      for (int64_t j0 = 0; j0 < N; j0 += kNC) panel(k0, kc, j0, ap, kc, 1, kMR);
    }
    return;
  }
  for (int64_t j0 = 0; j0 < N; j0 += kNC)
    for (int64_t k0 = 0; k0 < K; k0 += kKC) panel(k0, min64(kKC, K - k0), j0, a + k0 * a_sk, a_si, a_si, a_sk);
}

}  // namespace

void sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc) {
  driver(M, N, K, a, a_si, a_sk, b, ldb, false, beta, c, ldc);
}

void sgemm_bt(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_si, int64_t a_sk, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  driver(M, N, K, a, a_si, a_sk, b, ldb, true, beta, c, ldc);
}

// The FMA peak of this build (sgemm.h: simd_fma_peak): 12 independent accumulators, enough to
// cover the FMA latency times the FMA ports of the cores we run on, in registers only.
float fma_loop(int64_t iters, float x) {
  using V = typename Vec::V;
  constexpr int kAcc = 12;
  V acc[kAcc];
  const V a = Vec::set1(x), b = Vec::set1(1.0f - x);
#pragma GCC unroll 12
  for (int i = 0; i < kAcc; ++i) acc[i] = Vec::set1(static_cast<float>(i));
  for (int64_t t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; ++i) acc[i] = Vec::fma(acc[i], a, b);
  }
  V s = acc[0];
#pragma GCC unroll 12
  for (int i = 1; i < kAcc; ++i) s = Vec::add(s, acc[i]);
  return Vec::reduce(s);
}

}  // namespace slimkern::cpu::SK_GEMM_ISA
