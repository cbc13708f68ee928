// The kernels of csrc/forward.cu and csrc/backward.cu, run through the public entry points of
// similarity_kernels.h on the CPU CUDA emulation (emulation/), against a direct double
// computation of the contract. Checks indexing, tile edges, masks, strides, chunking and the
// launch sequences; not the hardware (real WMMA, memory model, speed). Built and run by
// tests/test_cuda_host.py; prints one line per failure and exits non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "similarity_kernels.h"

using namespace fused_losses;

namespace {

int failures = 0;
constexpr double kInf = INFINITY;

struct Case {
  DType dtype;
  bool single_pass_tf32;
  int64_t n, m, d, row_padding;  // rows of q and k are d + row_padding elements apart
  bool has_mask;
  int64_t offset;
  int num_sms;
  size_t workspace_limit;
};

std::string describe(const Case& c) {
  return "dtype " + std::to_string(static_cast<int>(c.dtype)) + (c.single_pass_tf32 ? " tf32" : "") + " " +
         std::to_string(c.n) + "x" + std::to_string(c.m) + "x" + std::to_string(c.d) + " pad " +
         std::to_string(c.row_padding) + " mask " + (c.has_mask ? std::to_string(c.offset) : "none") + " sms " +
         std::to_string(c.num_sms) + " limit " + std::to_string(c.workspace_limit);
}

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
        ++failures;
        std::printf("FAIL %s [%zu]: got %g, want %g\n", what.c_str(), t, got[t], want[t]);
        return;
      }
      continue;
    }
    worst = std::fmax(worst, std::fabs(got[t] - want[t]));
  }
  if (worst > tolerance * scale) {
    ++failures;
    std::printf("FAIL %s: max error %.3g > %.3g\n", what.c_str(), worst, tolerance * scale);
  }
}

// Inputs in the case's dtype (with row padding), and the same values as doubles.
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
  op.half_bits.assign(std::max<int64_t>(rows * stride, 1), 0x7e00);  // NaN in the padding
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
      } else if (c.dtype == DType::kFloat16) {
        const __half h(x);
        op.half_bits[i * stride + t] = h.bits;
        op.values[i * c.d + t] = static_cast<float>(h);
      } else {
        const __nv_bfloat16 h(x);
        op.half_bits[i * stride + t] = h.bits;
        op.values[i * c.d + t] = static_cast<float>(h);
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

void run_case(const Case& c, std::mt19937& rng) {
  const std::string name = describe(c);
  const Operand q = make_operand(c, c.n, rng, nullptr);
  const Operand k = make_operand(c, c.m, rng, &q);
  const std::vector<float> inv_q = inverse_norms(q, c.n, c.d), inv_k = inverse_norms(k, c.m, c.d);
  const float scale = 20.f, bias = -3.f;
  const SimilarityProblem problem{c.dtype, c.d == 0 ? nullptr : q.data(c.dtype), c.d + c.row_padding,
                                  c.d == 0 ? nullptr : k.data(c.dtype), c.d + c.row_padding, c.n, c.m, c.d,
                                  inv_q.data(), inv_k.data(), &scale, c.has_mask, c.offset};
  const LaunchConfig config{nullptr, c.num_sms, c.single_pass_tf32, c.workspace_limit};
  // Single-pass TF32 errs by ~1e-3 relative in S, hence by ~scale * 1e-3 in exp(S) and what follows.
  const bool tf32 = c.dtype == DType::kFloat32 && c.single_pass_tf32;
  const double lse_tol = tf32 ? 3e-2 : 2e-4, softplus_tol = tf32 ? 3e-2 : 1e-4;
  const double product_tol = tf32 ? 5e-2 : c.dtype != DType::kFloat32 ? 3e-3 : 1e-5;

  // Direct S, u and v in double.
  std::vector<double> s(c.n * c.m), u(c.n * c.d), v(c.m * c.d);
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t t = 0; t < c.d; ++t) u[i * c.d + t] = q.values[i * c.d + t] * inv_q[i];
  for (int64_t j = 0; j < c.m; ++j)
    for (int64_t t = 0; t < c.d; ++t) v[j * c.d + t] = k.values[j * c.d + t] * inv_k[j];
  for (int64_t i = 0; i < c.n; ++i) {
    for (int64_t j = 0; j < c.m; ++j) {
      double dot = 0;
      for (int64_t t = 0; t < c.d; ++t) dot += u[i * c.d + t] * v[j * c.d + t];
      s[i * c.m + j] = c.has_mask && j - i == c.offset ? -kInf : scale * dot;
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

  // Forward, with the poisoned outputs and workspace every kernel must overwrite.
  auto workspace_for = [](size_t bytes) { return std::vector<unsigned char>(bytes, 0xff); };
  std::vector<float> got_row(c.n, NAN), got_col(c.m, NAN);
  std::vector<unsigned char> ws = workspace_for(lse_forward_workspace_bytes(problem, true, true, config));
  lse_forward(problem, got_row.data(), got_col.data(), ws.data(), config);
  expect_close(name + " lse_row", got_row, lse_row, lse_tol, false);
  expect_close(name + " lse_col", got_col, lse_col, lse_tol, false);
  std::vector<float> cols_only(c.m, NAN);
  ws = workspace_for(lse_forward_workspace_bytes(problem, false, true, config));
  lse_forward(problem, nullptr, cols_only.data(), ws.data(), config);
  expect_close(name + " lse_col alone", cols_only, lse_col, lse_tol, false);
  std::vector<float> got_sp(c.n, NAN);
  ws = workspace_for(softplus_forward_workspace_bytes(problem, config));
  softplus_forward(problem, &bias, got_sp.data(), ws.data(), config);
  expect_close(name + " softplus", got_sp, sp_row, softplus_tol, true);

  // Backward: both directions of the softmax, then the sigmoid.
  std::normal_distribution<float> normal;
  std::vector<float> grad_row(c.n), grad_col(c.m), lse_row_f(c.n), lse_col_f(c.m);
  for (auto& g : grad_row) g = normal(rng);
  for (auto& g : grad_col) g = normal(rng);
  for (int64_t i = 0; i < c.n; ++i) lse_row_f[i] = static_cast<float>(lse_row[i]);
  for (int64_t j = 0; j < c.m; ++j) lse_col_f[j] = static_cast<float>(lse_col[j]);
  auto check_products = [&](const std::string& what, auto weight, const std::vector<float>& got_u,
                            const std::vector<float>& got_v) {
    std::vector<double> want_u(c.n * c.d, 0.0), want_v(c.m * c.d, 0.0);
    for (int64_t i = 0; i < c.n; ++i) {
      for (int64_t j = 0; j < c.m; ++j) {
        const double w = scale * weight(i, j);
        for (int64_t t = 0; t < c.d; ++t) {
          want_u[i * c.d + t] += w * v[j * c.d + t];
          want_v[j * c.d + t] += w * u[i * c.d + t];
        }
      }
    }
    expect_close(name + " " + what + " U", got_u, want_u, product_tol, true);
    expect_close(name + " " + what + " V", got_v, want_v, product_tol, true);
  };
  auto share = [&](int64_t i, int64_t j, double lse) {
    return s[i * c.m + j] == -kInf ? 0.0 : std::exp(s[i * c.m + j] - lse);
  };
  for (int directions = 1; directions <= 3; ++directions) {
    const bool rows = directions & 1, cols = directions & 2;
    std::vector<float> got_u(c.n * c.d, NAN), got_v(c.m * c.d, NAN);
    ws = workspace_for(lse_backward_workspace_bytes(problem, config));
    lse_backward(problem, lse_row_f.data(), lse_col_f.data(), rows ? grad_row.data() : nullptr,
                 cols ? grad_col.data() : nullptr, got_u.data(), got_v.data(), ws.data(), config);
    check_products("lse" + std::to_string(directions), [&](int64_t i, int64_t j) {
      return (rows ? grad_row[i] * share(i, j, lse_row_f[i]) : 0.0) + (cols ? grad_col[j] * share(i, j, lse_col_f[j]) : 0.0);
    }, got_u, got_v);
  }
  std::vector<float> got_u(c.n * c.d, NAN), got_v(c.m * c.d, NAN), got_bias(1, NAN);
  ws = workspace_for(softplus_backward_workspace_bytes(problem, config));
  softplus_backward(problem, &bias, grad_row.data(), got_u.data(), got_v.data(), got_bias.data(), ws.data(), config);
  auto sigmoid_weight = [&](int64_t i, int64_t j) { return grad_row[i] / (1.0 + std::exp(-(s[i * c.m + j] + bias))); };
  check_products("softplus", sigmoid_weight, got_u, got_v);
  double want_bias = 0;
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.m; ++j) want_bias += sigmoid_weight(i, j);
  expect_close(name + " grad_bias", got_bias, {want_bias}, product_tol, true);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const size_t kDefault = size_t{256} << 20;
  const Case cases[] = {
      {DType::kFloat16, false, 130, 70, 37, 0, true, 0, 132, kDefault},      // ragged tiles, odd D
      {DType::kBFloat16, false, 65, 200, 64, 0, true, -3, 2, kDefault},      // columns split across CTAs
      {DType::kFloat32, false, 150, 97, 40, 0, true, 2, 1, 1},               // 64-row chunks, 1 row block a launch
      {DType::kFloat32, true, 70, 66, 33, 0, false, 0, 4, kDefault},         // single-pass TF32
      {DType::kBFloat16, false, 129, 65, 72, 5, true, 1, 3, 1},              // padded rows: no 16-byte loads
      {DType::kFloat16, false, 64, 64, 96, 8, true, 70, 132, kDefault},      // mask outside the matrix
      {DType::kFloat16, false, 3, 1, 16, 0, true, 0, 132, kDefault},         // row 0 entirely masked
      {DType::kBFloat16, false, 40, 30, 0, 0, true, 0, 132, kDefault},       // D = 0
  };
  for (const Case& c : cases) run_case(c, rng);
  std::printf("%zu cases, %d failures\n", sizeof(cases) / sizeof(cases[0]), failures);
  return failures == 0 ? 0 : 1;
}
