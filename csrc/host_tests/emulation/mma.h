// Emulated WMMA: every thread of a warp holds the whole tile of a fragment (x[] in row-major
// logical order); lane 0 alone stores results. Loads follow the documented layouts: matrix_a
// row_major (r, c) at p[r * ldm + c], col_major at p[c * ldm + r], and likewise for matrix_b.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emulation.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout, class Element>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const Element* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) {
      const size_t offset = std::is_same<Layout, row_major>::value ? r * ldm + c : c * ldm + r;
      f.x[r * F::kCols + c] = static_cast<float>(p[offset]);
    }
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& x : f.x) x = value;
}

template <int M, int N, int K, class T, class LayoutA, class LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (threadIdx.x % 32 != 0) return;  // only lane 0's result is ever stored
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float sum = c.x[r * N + col];
      for (int k = 0; k < K; ++k) sum += a.x[r * K + k] * b.x[k * N + col];
      d.x[r * N + col] = sum;
    }
  }
}

// Round to nearest (ties away from zero), keeping 10 mantissa bits, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7f800000u) != 0x7f800000u) word = (word + 0x1000u) & 0xffffe000u;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

}  // namespace wmma
}  // namespace nvcuda
