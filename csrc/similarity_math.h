// Numerics and index math shared by the CUDA kernels and their host-side unit tests
// (csrc/host_tests/similarity_math_test.cpp compiles this header with the plain host compiler).
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

FL_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// [begin, end) of part `part` when [0, count) is cut into `parts` contiguous near-equal pieces;
// no piece is empty while parts <= count.
struct IndexRange {
  int64_t begin;
  int64_t end;
};

FL_HOST_DEVICE IndexRange split_range(int64_t count, int64_t parts, int64_t part) {
  return {count * part / parts, count * (part + 1) / parts};
}

// The optional diagonal mask removes S[i, i + offset] from every sum.
FL_HOST_DEVICE bool is_masked(int64_t row, int64_t col, bool has_mask, int64_t offset) {
  return has_mask && col - row == offset;
}

// ---------------------------------------------------------------------------------------------
// Log-sum-exp of a set of values, kept as (max, sum of exp(x - max)); the empty set, and a set of
// -inf values only, is {-inf, 0}, whose log-sum-exp is -inf.

struct LseState {
  float max;
  float sum;
};

FL_HOST_DEVICE LseState lse_empty() { return {kNegInf, 0.f}; }

// Log-sum-exp state of the union of two disjoint sets. Merging with the empty set returns the
// other state bit for bit.
FL_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  const float max = fmaxf(a.max, b.max);
  if (max == kNegInf) return lse_empty();  // -inf - -inf would be NaN below
  return {max, a.sum * expf(a.max - max) + b.sum * expf(b.max - max)};
}

// State of the values value_at(0 .. kCount-1): one max pass, then one exp per value.
template <int kCount, class ValueAt>
FL_HOST_DEVICE LseState lse_of_values(ValueAt value_at) {
  float max = kNegInf;
FL_UNROLL
  for (int t = 0; t < kCount; ++t) max = fmaxf(max, value_at(t));
  if (max == kNegInf) return lse_empty();
  float sum = 0.f;
FL_UNROLL
  for (int t = 0; t < kCount; ++t) sum += expf(value_at(t) - max);
  return {max, sum};
}

FL_HOST_DEVICE float lse_finish(LseState state) {
  return state.max == kNegInf ? kNegInf : state.max + logf(state.sum);
}

// ---------------------------------------------------------------------------------------------
// Elementwise functions, stable over the whole float range, -inf (a masked entry) included.

// log(1 + exp(x)); 0 at -inf.
FL_HOST_DEVICE float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

// 1 / (1 + exp(-x)) without overflow: exp is only taken of -|x|. 0 at -inf.
FL_HOST_DEVICE float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// exp(s - lse): the entry's probability under its row's (or column's) softmax. A masked entry
// gets 0 without evaluating exp: its row may be masked entirely (lse = -inf, so s - lse = NaN).
FL_HOST_DEVICE float softmax_share(float s, float lse) { return s == kNegInf ? 0.f : expf(s - lse); }

// ---------------------------------------------------------------------------------------------
// Row reductions of the forward pass. The kernels hand them s + shift for every entry of a row,
// -inf for the masked and out-of-range ones (shift: 0 for log-sum-exp, the bias for softplus).

struct LseReduction {
  using State = LseState;
  static FL_HOST_DEVICE State empty() { return lse_empty(); }
  template <int kCount, class ValueAt>
  static FL_HOST_DEVICE State of_values(ValueAt value_at) {
    return lse_of_values<kCount>(value_at);
  }
  static FL_HOST_DEVICE State merge(State a, State b) { return lse_merge(a, b); }
  static FL_HOST_DEVICE float finish(State state) { return lse_finish(state); }
};

struct SoftplusReduction {
  using State = float;
  static FL_HOST_DEVICE State empty() { return 0.f; }
  template <int kCount, class ValueAt>
  static FL_HOST_DEVICE State of_values(ValueAt value_at) {
    float sum = 0.f;
FL_UNROLL
    for (int t = 0; t < kCount; ++t) sum += softplus(value_at(t));
    return sum;
  }
  static FL_HOST_DEVICE State merge(State a, State b) { return a + b; }
  static FL_HOST_DEVICE float finish(State state) { return state; }
};

// ---------------------------------------------------------------------------------------------
// dL/dS_ij of the backward pass, given s = S_ij + shift (-inf when masked) and the entry's indices.

// W_ij = grad_row_i exp(S_ij - lse_row_i) + grad_col_j exp(S_ij - lse_col_j); a direction whose
// grad pointer is null is absent.
struct LseWeight {
  const float* lse_row;
  const float* lse_col;
  const float* grad_row;
  const float* grad_col;
  FL_HOST_DEVICE float operator()(float s, int64_t row, int64_t col) const {
    float w = 0.f;
    if (grad_row != nullptr) w += grad_row[row] * softmax_share(s, lse_row[row]);
    if (grad_col != nullptr) w += grad_col[col] * softmax_share(s, lse_col[col]);
    return w;
  }
};

// W_ij = grad_row_i sigmoid(S_ij + bias).
struct SoftplusWeight {
  const float* grad_row;
  FL_HOST_DEVICE float operator()(float s, int64_t row, int64_t /*col*/) const {
    return grad_row[row] * sigmoid(s);
  }
};

}  // namespace fused_losses
