// Framework-free entry points of the fused similarity kernels: raw device pointers, sizes,
// strides and a stream in, cudaError_t out. See fused_losses/backends/base.py for the math.
//
// Every launcher is asynchronous on config.stream, reads scale, bias and factor on the device (no
// host sync), uses no atomics (results are bitwise reproducible for a given GPU, problem and
// config), and needs the workspace its *_workspace_bytes function reports (see launch_plan.h).
// n, m > 0; d >= 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fused_losses {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// S_ij = scale * (inv_norm_q[i] q_i) . (inv_norm_k[j] k_j), with S[i, i + diag_offset] masked
// when has_mask. q is n x d and k is m x d, both with inner stride 1 and the given row strides
// (in elements, >= d, at most kMaxRowStrideBytes of launch_plan.h); inv_norm_q, inv_norm_k and
// scale are fp32.
// Label mask (the log-sum-exp entry points only; both label pointers null: none): S_ij is also
// masked where (row_labels[i] == col_labels[j]) == exclude_same_label; row_labels (n) and
// col_labels (m) are int64 on the device. A row or column with every entry masked has lse -inf
// and weights 0.
struct SimilarityProblem {
  DType dtype;
  const void* q;
  int64_t q_row_stride;
  const void* k;
  int64_t k_row_stride;
  int64_t n;
  int64_t m;
  int64_t d;
  const float* inv_norm_q;
  const float* inv_norm_k;
  const float* scale;  // 0-d
  bool has_mask;
  int64_t diag_offset;
  const int64_t* row_labels;
  const int64_t* col_labels;
  bool exclude_same_label;
};

struct LaunchConfig {
  cudaStream_t stream;
  int num_sms;                 // of the device; sizes the grids
  bool fp32_single_pass_tf32;  // fp32 inputs: one TF32 product instead of three (split TF32)
  size_t workspace_limit;      // soft cap on the workspace (see launch_plan.h)
};

// lse_row (n) and / or lse_col (m): either may be null, not both.
size_t lse_forward_workspace_bytes(const SimilarityProblem& problem, bool want_rows, bool want_cols,
                                   const LaunchConfig& config);
cudaError_t lse_forward(const SimilarityProblem& problem, float* lse_row, float* lse_col,
                        void* workspace, const LaunchConfig& config);

// sp_row (n), sp_row_i = sum_j softplus(S_ij + bias); bias is 0-d fp32 on the device.
size_t softplus_forward_workspace_bytes(const SimilarityProblem& problem, const LaunchConfig& config);
cudaError_t softplus_forward(const SimilarityProblem& problem, const float* bias, float* sp_row,
                             void* workspace, const LaunchConfig& config);

// The backward's fused kernel, the weights writer of fused_losses/backends/chunked_backward.py.
// It writes rows [row_start, row_stop) of
//     W~_ij = row_scale[i - row_start] * col_scale[j] * W_ij,   W = dL/dS,
// entry (i, j) at out[(i - row_start) * out_row_stride + j] (all m columns), in the input dtype for
// fp16 / bf16 inputs and fp32 for fp32 inputs, computed in fp32 and rounded once; masked entries
// are 0. row_scale (row_stop - row_start) and col_scale (m) are fp32 on the device. S is
// recomputed with the forward's tiles, so it is the forward's S bit for bit.
// 0 <= row_start < row_stop <= n, out_row_stride >= m.
struct WeightsChunk {
  int64_t row_start;
  int64_t row_stop;
  void* out;
  int64_t out_row_stride;
  const float* row_scale;
  const float* col_scale;
};

// W_ij = grad_row_i exp(S_ij - lse_row_i) + grad_col_j exp(S_ij - lse_col_j). grad_row / grad_col
// may be null (that direction is absent, and its lse is not read), not both. No workspace.
cudaError_t lse_weights(const SimilarityProblem& problem, const float* lse_row, const float* lse_col,
                        const float* grad_row, const float* grad_col, const WeightsChunk& chunk,
                        const LaunchConfig& config);

// W_ij = grad_row_i sigmoid(S_ij + bias); also *weight_sum (0-d fp32) <- the chunk's sum of W
// (unscaled), summed in a fixed order.
size_t softplus_weights_workspace_bytes(const SimilarityProblem& problem, const WeightsChunk& chunk,
                                        const LaunchConfig& config);
cudaError_t softplus_weights(const SimilarityProblem& problem, const float* bias, const float* grad_row,
                             const WeightsChunk& chunk, float* weight_sum, void* workspace,
                             const LaunchConfig& config);

}  // namespace fused_losses
