// The kernels of csrc/forward.cu and csrc/weights.cu, run through the public entry points of
// similarity_kernels.h on the CPU CUDA emulation (emulation/), against a direct double
// computation of the contract; and the S behind the weights compared bit for bit with the S
// behind the forward statistics. Checks indexing, fragment layouts, swizzles, tile edges, masks
// (diagonal and labels), strides, column splits, chunks and the launch sequences; not the
// hardware (timing, memory model, speed). Built and run by tests/test_cuda_host.py; prints one line per failure and exits
// non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "similarity_kernels.h"

using namespace fused_losses;

namespace {

int failures = 0;
constexpr double kInf = INFINITY;

// The label mask of a case (the log-sum-exp's): none, or labels of `classes` classes drawn at
// random (classes = 0: row i and column i get label i), masking equal labels (kExclude) or
// different ones (kOnly). Every stray_rows-th row gets a label no column has, and every
// stray_cols-th column a class's label plus 2^32, which no row has (only a 32-bit compare would
// match it): with kOnly those rows and columns are entirely masked.
enum class LabelMode { kNone, kExclude, kOnly };

struct LabelCase {
  LabelMode mode;
  int classes;
  int stray_rows, stray_cols;  // 0: none
};

constexpr LabelCase kNoLabels{LabelMode::kNone, 0, 0, 0};

struct Case {
  DType dtype;
  bool single_pass_tf32;
  int64_t n, m, d, row_padding;  // rows of q and k are d + row_padding elements apart
  bool has_mask;
  int64_t offset;
  int num_sms, ctas_per_sm;
  size_t workspace_limit;
  int64_t row_start, row_stop, out_padding;  // the weights chunk; out rows are m + out_padding apart
  LabelCase labels;
};

std::string describe(const Case& c) {
  return "dtype " + std::to_string(static_cast<int>(c.dtype)) + (c.single_pass_tf32 ? " tf32" : "") + " " +
         std::to_string(c.n) + "x" + std::to_string(c.m) + "x" + std::to_string(c.d) + " pad " +
         std::to_string(c.row_padding) + " mask " + (c.has_mask ? std::to_string(c.offset) : "none") + " sms " +
         std::to_string(c.num_sms) + "x" + std::to_string(c.ctas_per_sm) + " limit " +
         std::to_string(c.workspace_limit) + " rows " + std::to_string(c.row_start) + ".." +
         std::to_string(c.row_stop) +
         (c.labels.mode == LabelMode::kNone
              ? ""
              : std::string(" labels ") + (c.labels.mode == LabelMode::kExclude ? "exclude" : "only") + " of " +
                    std::to_string(c.labels.classes));
}

void fail(const std::string& message) {
  ++failures;
  std::printf("FAIL %s\n", message.c_str());
}

// max |got - want| <= tolerance * scale, scale = max(1, max |want|) when relative; infinities and
// NaN must match exactly.
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                  double tolerance, bool relative) {
  double scale = 1.0;
  if (relative) {
    for (double w : want) scale = std::isfinite(w) ? std::fmax(scale, std::fabs(w)) : scale;
  }
  double worst = 0.0;
  for (size_t t = 0; t < want.size(); ++t) {
    if (std::isinf(want[t]) || !std::isfinite(got[t])) {
      if (static_cast<double>(got[t]) != want[t]) {
        fail(what + " [" + std::to_string(t) + "]: got " + std::to_string(got[t]) + ", want " +
             std::to_string(want[t]));
        return;
      }
      continue;
    }
    worst = std::fmax(worst, std::fabs(got[t] - want[t]));
  }
  if (worst > tolerance * scale) {
    fail(what + ": max error " + std::to_string(worst) + " > " + std::to_string(tolerance * scale));
  }
}

// Values of one element type: float, or the 16-bit types through their bits.
template <class T>
float to_float(uint16_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(bits));
  return static_cast<float>(value);
}

template <class T>
uint16_t to_bits(float x) {
  const T value(x);
  uint16_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

uint16_t nan_bits(DType dtype) { return dtype == DType::kFloat16 ? 0x7e00 : 0x7fc0; }

// Inputs in the case's dtype (with row padding, NaN there), and the same values as doubles.
struct Operand {
  std::vector<uint16_t> half_bits;
  std::vector<float> floats;
  std::vector<double> values;  // rows x d, dense
  const void* data(DType dtype) const {
    return dtype == DType::kFloat32 ? static_cast<const void*>(floats.data()) : half_bits.data();
  }
};

Operand make_operand(const Case& c, int64_t rows, std::mt19937& rng, const Operand* correlated) {
  const int64_t stride = c.d + c.row_padding;
  Operand op;
  op.values.resize(rows * c.d);
  op.floats.assign(std::max<int64_t>(rows * stride, 1), NAN);
  op.half_bits.assign(std::max<int64_t>(rows * stride, 1), nan_bits(c.dtype));
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t t = 0; t < c.d; ++t) {
      float x = normal(rng);
      if (correlated != nullptr && i * c.d + t < static_cast<int64_t>(correlated->values.size())) {
        x += 2.f * static_cast<float>(correlated->values[i * c.d + t]);
      }
      if (c.dtype == DType::kFloat32) {
        op.floats[i * stride + t] = x;
        op.values[i * c.d + t] = x;
      } else {
        const uint16_t bits = c.dtype == DType::kFloat16 ? to_bits<__half>(x) : to_bits<__nv_bfloat16>(x);
        op.half_bits[i * stride + t] = bits;
        op.values[i * c.d + t] = c.dtype == DType::kFloat16 ? to_float<__half>(bits) : to_float<__nv_bfloat16>(bits);
      }
    }
  }
  return op;
}

std::vector<float> inverse_norms(const Operand& op, int64_t rows, int64_t d) {
  std::vector<float> inv(rows);
  for (int64_t i = 0; i < rows; ++i) {
    double sum = 0;
    for (int64_t t = 0; t < d; ++t) sum += op.values[i * d + t] * op.values[i * d + t];
    inv[i] = static_cast<float>(1.0 / std::fmax(std::sqrt(sum), 1e-6));
  }
  return inv;
}

// (row labels (n), column labels (m)) of the case; empty without a label mask.
std::pair<std::vector<int64_t>, std::vector<int64_t>> make_labels(const Case& c, std::mt19937& rng) {
  const LabelCase& l = c.labels;
  if (l.mode == LabelMode::kNone) return {};
  std::vector<int64_t> rows(c.n), cols(c.m);
  auto label = [&](int64_t index) { return l.classes == 0 ? index : static_cast<int64_t>(rng() % l.classes); };
  for (int64_t i = 0; i < c.n; ++i) {
    rows[i] = l.stray_rows != 0 && i % l.stray_rows == l.stray_rows - 1 ? c.n + c.m + i : label(i);
  }
  for (int64_t j = 0; j < c.m; ++j) {
    cols[j] = label(j) + (l.stray_cols != 0 && j % l.stray_cols == l.stray_cols - 1 ? int64_t{1} << 32 : 0);
  }
  return {rows, cols};
}

std::vector<unsigned char> poisoned_workspace(size_t bytes) {
  return std::vector<unsigned char>(std::max<size_t>(bytes, 1), 0xff);
}

// Every entry of S a kernel computed, as bits of S in log2 units, and how often.
std::map<std::pair<int64_t, int64_t>, std::pair<uint32_t, int>>* observed = nullptr;

void record_similarity(int64_t row, int64_t col, float s2) {
  uint32_t bits;
  std::memcpy(&bits, &s2, sizeof(bits));
  auto& entry = (*observed)[{row, col}];
  entry = {bits, entry.second + 1};
}

void run_case(const Case& c, std::mt19937& rng) {
  const std::string name = describe(c);
  emulation::ctas_per_sm = c.ctas_per_sm;
  const Operand q = make_operand(c, c.n, rng, nullptr);
  const Operand k = make_operand(c, c.m, rng, &q);
  const std::vector<float> inv_q = inverse_norms(q, c.n, c.d), inv_k = inverse_norms(k, c.m, c.d);
  const float scale = 20.f, bias = -3.f;
  const auto [row_labels, col_labels] = make_labels(c, rng);
  const bool labelled = c.labels.mode != LabelMode::kNone, exclude_same = c.labels.mode == LabelMode::kExclude;
  const SimilarityProblem problem{c.dtype,
                                  c.d == 0 ? nullptr : q.data(c.dtype),
                                  c.d + c.row_padding,
                                  c.d == 0 ? nullptr : k.data(c.dtype),
                                  c.d + c.row_padding,
                                  c.n,
                                  c.m,
                                  c.d,
                                  inv_q.data(),
                                  inv_k.data(),
                                  &scale,
                                  c.has_mask,
                                  c.offset,
                                  labelled ? row_labels.data() : nullptr,
                                  labelled ? col_labels.data() : nullptr,
                                  exclude_same};
  const LaunchConfig config{nullptr, c.num_sms, c.single_pass_tf32, c.workspace_limit};
  // Single-pass TF32 errs by ~1e-3 relative in S, hence by ~scale * 1e-3 in exp(S) and what follows.
  const bool tf32 = c.dtype == DType::kFloat32 && c.single_pass_tf32;
  const double lse_tol = tf32 ? 3e-2 : 2e-4, softplus_tol = tf32 ? 3e-2 : 1e-4;
  // W~ is stored in the input dtype for 16-bit inputs: relative rounding 2^-9 (bf16), 2^-12 (fp16).
  const double weights_rel =
      tf32 ? 5e-2 : c.dtype == DType::kBFloat16 ? 4e-3 : c.dtype == DType::kFloat16 ? 5e-4 : 1e-4;

  // Direct S in double.
  std::vector<double> s(c.n * c.m);
  for (int64_t i = 0; i < c.n; ++i) {
    for (int64_t j = 0; j < c.m; ++j) {
      double dot = 0;
      for (int64_t t = 0; t < c.d; ++t) dot += q.values[i * c.d + t] * k.values[j * c.d + t];
      const bool masked = (c.has_mask && j - i == c.offset) ||
                          (labelled && (row_labels[i] == col_labels[j]) == exclude_same);
      s[i * c.m + j] = masked ? -kInf : scale * dot * inv_q[i] * inv_k[j];
    }
  }
  auto lse_of = [&](bool rows, int64_t index) {
    const int64_t count = rows ? c.m : c.n;
    double max = -kInf, sum = 0;
    for (int64_t t = 0; t < count; ++t) max = std::fmax(max, rows ? s[index * c.m + t] : s[t * c.m + index]);
    if (max == -kInf) return -kInf;
    for (int64_t t = 0; t < count; ++t) sum += std::exp((rows ? s[index * c.m + t] : s[t * c.m + index]) - max);
    return max + std::log(sum);
  };
  std::vector<double> lse_row(c.n), lse_col(c.m), sp_row(c.n, 0.0);
  for (int64_t i = 0; i < c.n; ++i) lse_row[i] = lse_of(true, i);
  for (int64_t j = 0; j < c.m; ++j) lse_col[j] = lse_of(false, j);
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.m; ++j) sp_row[i] += std::log1p(std::exp(s[i * c.m + j] + bias));

  // Forward, with poisoned outputs and workspace; the S of both directions recorded.
  std::map<std::pair<int64_t, int64_t>, std::pair<uint32_t, int>> forward_s, weights_s;
  std::vector<float> got_row(c.n, NAN), got_col(c.m, NAN);
  std::vector<unsigned char> ws = poisoned_workspace(lse_forward_workspace_bytes(problem, true, true, config));
  observed = &forward_s;
  emulation::observe_similarity = record_similarity;
  if (lse_forward(problem, got_row.data(), got_col.data(), ws.data(), config) != cudaSuccess) {
    fail(name + " lse_forward");
  }
  emulation::observe_similarity = nullptr;
  expect_close(name + " lse_row", got_row, lse_row, lse_tol, false);
  expect_close(name + " lse_col", got_col, lse_col, lse_tol, false);
  // Every entry of the matrix once (the column splits and row blocks cover it exactly).
  int64_t inside = 0;
  for (const auto& [entry, value] : forward_s) {
    if (entry.first >= c.n || entry.second >= c.m) continue;
    ++inside;
    if (value.second != 1) {
      fail(name + " forward: entry computed " + std::to_string(value.second) + " times");
      break;
    }
  }
  if (inside != c.n * c.m) fail(name + " forward: not every entry of S computed");
  std::vector<float> rows_only(c.n, NAN), cols_only(c.m, NAN);
  ws = poisoned_workspace(lse_forward_workspace_bytes(problem, true, false, config));
  lse_forward(problem, rows_only.data(), nullptr, ws.data(), config);
  expect_close(name + " lse_row alone", rows_only, lse_row, lse_tol, false);
  ws = poisoned_workspace(lse_forward_workspace_bytes(problem, false, true, config));
  lse_forward(problem, nullptr, cols_only.data(), ws.data(), config);
  expect_close(name + " lse_col alone", cols_only, lse_col, lse_tol, false);
  std::vector<float> got_sp(c.n, NAN);
  ws = poisoned_workspace(softplus_forward_workspace_bytes(problem, config));
  const cudaError_t softplus_status = softplus_forward(problem, &bias, got_sp.data(), ws.data(), config);
  if (labelled) {  // the label mask is the log-sum-exp's: the softplus entry points refuse it
    if (softplus_status != cudaErrorInvalidValue) fail(name + " softplus_forward took a label mask");
  } else {
    expect_close(name + " softplus", got_sp, sp_row, softplus_tol, true);
  }

  // Weights of the chunk: W~ = row_scale_i col_scale_j W_ij, every out entry of the chunk
  // written, the padding of out left alone.
  std::normal_distribution<float> normal;
  std::vector<float> grad_row(c.n), grad_col(c.m), lse_row_f(c.n), lse_col_f(c.m);
  for (auto& g : grad_row) g = normal(rng);
  for (auto& g : grad_col) g = normal(rng);
  for (int64_t i = 0; i < c.n; ++i) lse_row_f[i] = static_cast<float>(lse_row[i]);
  for (int64_t j = 0; j < c.m; ++j) lse_col_f[j] = static_cast<float>(lse_col[j]);
  const int64_t rows = c.row_stop - c.row_start, ld = c.m + c.out_padding;
  std::vector<float> row_scale(rows), col_scale(c.m);
  for (int64_t r = 0; r < rows; ++r) {
    row_scale[r] = 64.f * inv_q[c.row_start + r] * (1.f + 0.01f * static_cast<float>(r % 7));
  }
  for (int64_t j = 0; j < c.m; ++j) col_scale[j] = inv_k[j] * (1.f + 0.02f * static_cast<float>(j % 5));
  auto run_weights = [&](const std::string& what, auto launch, auto weight) {
    const bool fp32 = c.dtype == DType::kFloat32;
    std::vector<float> out_floats(fp32 ? rows * ld : 0, NAN);
    std::vector<uint16_t> out_bits(fp32 ? 0 : rows * ld, nan_bits(c.dtype));
    const WeightsChunk chunk{c.row_start,
                             c.row_stop,
                             fp32 ? static_cast<void*>(out_floats.data()) : static_cast<void*>(out_bits.data()),
                             ld,
                             row_scale.data(),
                             col_scale.data()};
    if (launch(chunk) != cudaSuccess) fail(name + " " + what + ": launch failed");
    std::vector<float> got;
    std::vector<double> want;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < ld; ++j) {
        const float value = fp32 ? out_floats[r * ld + j]
                                 : (c.dtype == DType::kFloat16 ? to_float<__half>(out_bits[r * ld + j])
                                                                : to_float<__nv_bfloat16>(out_bits[r * ld + j]));
        if (j >= c.m) {
          if (!std::isnan(value)) fail(name + " " + what + ": padding of out written");
          continue;
        }
        const int64_t i = c.row_start + r;
        const double w = s[i * c.m + j] == -kInf ? 0.0 : double{row_scale[r]} * col_scale[j] * weight(i, j);
        if (s[i * c.m + j] == -kInf && value != 0.f) fail(name + " " + what + ": masked entry not 0");
        got.push_back(value);
        want.push_back(w);
      }
    }
    double scale = 0;
    for (double w : want) scale = std::fmax(scale, std::fabs(w));
    double worst = 0;
    for (size_t t = 0; t < want.size(); ++t) {
      if (!std::isfinite(got[t])) {
        fail(name + " " + what + ": non-finite W~");
        return;
      }
      worst = std::fmax(worst, std::fabs(got[t] - want[t]) / (std::fabs(want[t]) + 1e-3 * scale));
    }
    if (worst > weights_rel) fail(name + " " + what + ": max relative error " + std::to_string(worst));
  };
  auto share = [&](int64_t i, int64_t j, double lse) { return std::exp(s[i * c.m + j] - lse); };
  for (int directions = 1; directions <= 3; ++directions) {
    const bool with_rows = directions & 1, with_cols = directions & 2;
    observed = &weights_s;
    emulation::observe_similarity = directions == 3 ? record_similarity : nullptr;
    run_weights(
        "lse weights " + std::to_string(directions),
        [&](const WeightsChunk& chunk) {
          return lse_weights(problem, lse_row_f.data(), lse_col_f.data(), with_rows ? grad_row.data() : nullptr,
                             with_cols ? grad_col.data() : nullptr, chunk, config);
        },
        [&](int64_t i, int64_t j) {
          return (with_rows ? grad_row[i] * share(i, j, lse_row_f[i]) : 0.0) +
                 (with_cols ? grad_col[j] * share(i, j, lse_col_f[j]) : 0.0);
        });
    emulation::observe_similarity = nullptr;
  }
  // The weights' S is the forward's, bit for bit, for every entry of the chunk.
  for (int64_t i = c.row_start; i < c.row_stop; ++i) {
    for (int64_t j = 0; j < c.m; ++j) {
      const auto found = weights_s.find({i, j});
      if (found == weights_s.end() || found->second.first != forward_s[{i, j}].first) {
        fail(name + " weights: S differs from the forward's at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
        i = c.row_stop;
        break;
      }
    }
  }

  auto sigmoid = [&](int64_t i, int64_t j) { return 1.0 / (1.0 + std::exp(-(s[i * c.m + j] + bias))); };
  float weight_sum = NAN;
  if (labelled) {
    std::vector<float> out(c.m);
    const WeightsChunk chunk{c.row_start, c.row_start + 1, out.data(), c.m, row_scale.data(), col_scale.data()};
    std::vector<unsigned char> sums = poisoned_workspace(softplus_weights_workspace_bytes(problem, chunk, config));
    if (softplus_weights(problem, &bias, grad_row.data(), chunk, &weight_sum, sums.data(), config) !=
        cudaErrorInvalidValue) {
      fail(name + " softplus_weights took a label mask");
    }
    return;
  }
  run_weights(
      "sigmoid weights",
      [&](const WeightsChunk& chunk) {
        std::vector<unsigned char> sums = poisoned_workspace(softplus_weights_workspace_bytes(problem, chunk, config));
        return softplus_weights(problem, &bias, grad_row.data(), chunk, &weight_sum, sums.data(), config);
      },
      [&](int64_t i, int64_t j) { return grad_row[i] * sigmoid(i, j); });
  double want_sum = 0;
  for (int64_t i = c.row_start; i < c.row_stop; ++i)
    for (int64_t j = 0; j < c.m; ++j) want_sum += s[i * c.m + j] == -kInf ? 0.0 : grad_row[i] * sigmoid(i, j);
  expect_close(name + " weight sum", {weight_sum}, {want_sum}, tf32 ? 3e-2 : 1e-5, true);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const size_t kDefault = size_t{256} << 20;
  const LabelMode kExclude = LabelMode::kExclude, kOnly = LabelMode::kOnly;
  const Case cases[] = {
      // dtype, tf32, n, m, d, pad, mask, offset, sms, ctas/SM, limit, row_start, row_stop, out padding, labels
      {DType::kFloat16, false, 131, 70, 37, 0, true, 0, 132, 2, kDefault, 0, 131, 0, kNoLabels},  // ragged, odd D
      {DType::kBFloat16, false, 67, 389, 72, 0, true, -3, 3, 1, kDefault, 5, 61, 3, kNoLabels},  // 4 tiles, 3 CTAs
      {DType::kBFloat16, false, 263, 131, 200, 8, true, 1, 1, 1, 1, 130, 263, 1, kNoLabels},  // a launch per block
      {DType::kFloat32, false, 150, 97, 40, 0, true, 2, 3, 1, kDefault, 17, 150, 2, kNoLabels},  // split TF32
      {DType::kFloat32, true, 70, 131, 33, 0, false, 0, 4, 2, kDefault, 0, 70, 0, kNoLabels},  // single-pass TF32
      {DType::kFloat16, false, 129, 65, 72, 5, true, 70, 3, 2, kDefault, 1, 128, 0, kNoLabels},  // unaligned rows
      {DType::kBFloat16, false, 3, 1, 16, 0, true, 0, 132, 2, kDefault, 0, 3, 1, kNoLabels},  // row 0 all masked
      {DType::kBFloat16, false, 40, 30, 0, 0, true, 0, 132, 2, kDefault, 11, 29, 0, kNoLabels},  // D = 0
      // Label masks: equal labels masked, with the diagonal, over 2 row blocks x 4 column tiles split
      // across CTAs; only equal labels kept, stray rows and columns entirely masked, a few rows
      // against 5 column tiles of one CTA each, odd D (element loads); the one class of almost every
      // row and column excluded: those rows entirely masked; single-pass TF32, a launch per row
      // block, both kinds of strays; distinct labels and "only": the diagonal alone is kept, and the
      // diagonal mask takes it, so every row and column is entirely masked.
      {DType::kBFloat16, false, 131, 389, 72, 0, true, 0, 3, 1, kDefault, 7, 131, 1, {kExclude, 5, 11, 13}},
      {DType::kFloat16, false, 37, 521, 37, 0, true, -3, 132, 2, kDefault, 0, 37, 0, {kOnly, 3, 7, 5}},
      {DType::kFloat32, false, 97, 150, 40, 0, true, 2, 3, 1, kDefault, 3, 97, 2, {kExclude, 1, 4, 0}},
      {DType::kFloat32, true, 263, 131, 33, 0, false, 0, 4, 2, 1, 120, 263, 0, {kOnly, 4, 9, 6}},
      {DType::kBFloat16, false, 70, 70, 24, 0, true, 0, 132, 2, kDefault, 0, 70, 0, {kOnly, 0, 0, 0}},
  };
  for (const Case& c : cases) run_case(c, rng);
  std::printf("%zu cases, %d failures\n", sizeof(cases) / sizeof(cases[0]), failures);
  return failures == 0 ? 0 : 1;
}
