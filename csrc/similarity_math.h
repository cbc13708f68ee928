// Numerics and index math shared by the CUDA kernels and their host-side unit tests
// (csrc/host_tests/similarity_math_test.cpp compiles this header with the plain host compiler).
//
// The kernels work in log2 units: S2 = S * log2(e), so that every exponential is one ex2 and every
// logarithm one lg2. Log-sum-exp states, softplus sums and the lse vectors of the weights are
// converted at the boundary (lse = lse2 * ln 2).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_HOST_DEVICE inline
#define FL_UNROLL
#endif

namespace fused_losses {

constexpr float kNegInf = -INFINITY;
constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FL_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the column tiles of a row block are cut into `parts` contiguous near-equal pieces, computed
// on the host (the kernels then find their range without a division): every piece gets
// tiles_per_split tiles, the first `extra` one more.
struct ColumnSplit {
  int tiles_per_split;
  int extra;
};

struct TileRange {
  int begin;
  int end;
};

// count tiles (< 2^31) into parts splits, 1 <= parts <= count.
FL_HOST_DEVICE ColumnSplit column_split(int64_t count, int64_t parts) {
  return {static_cast<int>(count / parts), static_cast<int>(count % parts)};
}

FL_HOST_DEVICE TileRange split_tiles(ColumnSplit split, int part) {
  const int begin = part * split.tiles_per_split + (part < split.extra ? part : split.extra);
  return {begin, begin + split.tiles_per_split + (part < split.extra ? 1 : 0)};
}

// ---------------------------------------------------------------------------------------------
// The MUFU approximations on the device (ex2 / lg2 / rcp .approx.ftz: about 2 ulp, subnormal
// results flushed to 0), the C library on the host. exp2(-inf) = 0, log2(0) = -inf.

FL_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

FL_HOST_DEVICE float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x);
#endif
}

FL_HOST_DEVICE float fast_reciprocal(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// The larger of a and b, NaN if either is NaN (fmaxf would drop a NaN).
FL_HOST_DEVICE float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return std::isnan(a) || std::isnan(b) ? NAN : std::fmax(a, b);
#endif
}

// ---------------------------------------------------------------------------------------------
// Log-sum-exp of a set of values (log2 units), kept as (max, sum of exp2(x - max)); the empty
// set, and a set of -inf values only, is {-inf, 0}, whose log-sum-exp is -inf.

struct LseState {
  float max;
  float sum;
};

FL_HOST_DEVICE LseState lse_empty() { return {kNegInf, 0.f}; }

// Log-sum-exp state of the union of two disjoint sets. Merging with the empty set returns the
// other state bit for bit.
FL_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  const float max = nan_max(a.max, b.max);
  if (max == kNegInf) return lse_empty();  // -inf - -inf would be NaN below
  return {max, a.sum * fast_exp2(a.max - max) + b.sum * fast_exp2(b.max - max)};
}

// The set's log-sum-exp in natural units.
FL_HOST_DEVICE float lse_finish(LseState state) {
  return state.max == kNegInf ? kNegInf : (state.max + fast_log2(state.sum)) * kLn2;
}

// ---------------------------------------------------------------------------------------------
// Elementwise functions of x2 = x * log2(e), stable over the whole float range, -inf (a masked
// entry) included.

// softplus(x) / ln 2 = max(x2, 0) + log2(1 + 2^-|x2|); 0 at -inf. log2(1 + e) as
// log2(u) e / (u - 1) with u = 1 + e rounded (Goldberg), accurate where e is tiny.
FL_HOST_DEVICE float softplus2(float x2) {
  const float e = fast_exp2(-fabsf(x2));
  const float u = 1.f + e;
  const float log1p2 = u == 1.f ? e * kLog2E : fast_log2(u) * e * fast_reciprocal(u - 1.f);
  return fmaxf(x2, 0.f) + log1p2;
}

// sigmoid(x) = 1 / (1 + exp(-x)) without overflow: the exponential is only taken of -|x|. 0 at -inf.
FL_HOST_DEVICE float sigmoid2(float x2) {
  const float e = fast_exp2(-fabsf(x2));
  return (x2 >= 0.f ? 1.f : e) * fast_reciprocal(1.f + e);
}

// ---------------------------------------------------------------------------------------------
// Which entries of S drop out of every sum: those outside the n x m matrix, with a diagonal mask
// S[i, i + offset], and with a label mask those labels_exclude() names (below; tile_mma.cuh's
// LabelledEntryMask combines the two). The one place the kernels decide it. A thread sees the
// entries (row_base + r, col_base + c) of a tile for small compile-time offsets r, c, so the mask
// is kept relative to that corner: three integers per tile, one compare of constants per test.
struct EntryMask {
  int rows_left;  // entries with r >= rows_left lie below the matrix
  int cols_left;  // c >= cols_left: right of the matrix
  int diagonal;   // c - r of the masked diagonal, or kNoDiagonal

  static constexpr int kNoDiagonal = -(1 << 30);

  FL_HOST_DEVICE bool excludes(int r, int c) const { return r >= rows_left || c >= cols_left || c - r == diagonal; }
};

// The mask of the entries (row_base + r, col_base + c), 0 <= r, c < kSpan; has_diagonal: mask
// S[i, i + offset].
template <int kSpan>
FL_HOST_DEVICE EntryMask entry_mask(int64_t row_base, int64_t col_base, int64_t n, int64_t m, bool has_diagonal,
                                    int64_t offset) {
  const int64_t rows = n - row_base, cols = m - col_base;
  const int64_t local = offset - (col_base - row_base);  // c - r on the masked diagonal
  const bool crosses = has_diagonal && local > -kSpan && local < kSpan;
  return {static_cast<int>(rows < kSpan ? rows : kSpan), static_cast<int>(cols < kSpan ? cols : kSpan),
          crosses ? static_cast<int>(local) : EntryMask::kNoDiagonal};
}

// The label mask of fused_losses/backends/base.py (LABEL_MASK): an entry is also masked where its
// row's and its column's labels are equal (exclude_same) or differ (!exclude_same).
FL_HOST_DEVICE bool labels_exclude(int64_t row_label, int64_t col_label, bool exclude_same) {
  return (row_label == col_label) == exclude_same;
}

}  // namespace fused_losses
