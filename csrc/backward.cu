// Backward kernels: one recomputation of S per chunk of rows gives W = dL/dS for both directions;
// U = dL/du and V = dL/dv are then two tiled products with the chunk of W (see BackwardPlan).
#include <algorithm>

#include "kernel_common.cuh"

namespace fused_losses {
namespace {

// One CTA: the (blockIdx.y, blockIdx.x) tile of the chunk starting at row chunk_row0. Writes
// scale * W into weights (chunk-local rows) and, when tile_sums is set, the tile's sum of W into
// tile_sums[blockIdx.y][blockIdx.x]. shift (nullable) is added to S before weight() sees it.
template <class Config, class Weight>
__global__ void __launch_bounds__(kThreads)
    weights_kernel(SimilarityProblem problem, const float* shift_ptr, Weight weight, int64_t chunk_row0,
                   float* weights, int64_t weights_ld, float* tile_sums) {
  using Input = typename Config::InputType;
  __shared__ TileShared<Input> shared;
  const int64_t row0 = chunk_row0 + blockIdx.y * static_cast<int64_t>(kTileRows);
  const int64_t col0 = blockIdx.x * static_cast<int64_t>(kTileCols);
  compute_tile<Config, wmma::row_major, wmma::col_major>(shared, q_matrix<Input>(problem), k_matrix<Input>(problem),
                                                         row0, col0, problem.d);
  const float scale = *problem.scale;
  const float shift = shift_ptr == nullptr ? 0.f : *shift_ptr;

  float weight_sum = 0.f;
  // Consecutive threads take consecutive columns: coalesced stores of the weights.
  for (int e = threadIdx.x; e < kTileRows * kTileCols; e += kThreads) {
    const int r = e / kTileCols;
    const int c = e % kTileCols;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row >= problem.n || col >= problem.m) continue;
    const float s = similarity_entry(scale * problem.inv_norm_q[row], problem.inv_norm_k[col], shared.result[r][c],
                                     is_masked(row, col, problem.has_mask, problem.diag_offset));
    const float w = weight(s + shift, row, col);
    weight_sum += w;
    weights[(row - chunk_row0) * weights_ld + col] = scale * w;
  }
  if (tile_sums != nullptr) {
    const float tile_sum = block_sum(weight_sum);
    if (threadIdx.x == 0) tile_sums[blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x] = tile_sum;
  }
}

// out (out_rows x out_cols, contiguous) (+)= A B for the (blockIdx.x, blockIdx.y) tile, with A the
// chunk of scale * W (LayoutA row-major: A = scale W, for U; column-major: A = (scale W)^T, for V)
// and B rows of k (for U) or q (for V) scaled by their inverse norms on the way in, i.e. rows of
// v or u. The sum runs over depth_size (m for U, the chunk's rows for V).
template <bool kSplitTf32, class LayoutA, class Input>
__global__ void __launch_bounds__(kThreads)
    weighted_rows_kernel(GlobalMatrix<float> weights, GlobalMatrix<Input> rows, int64_t depth_size, float* out,
                         int64_t out_rows, int64_t out_cols, bool accumulate) {
  __shared__ TileShared<float> shared;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(kTileRows);
  const int64_t col0 = blockIdx.y * static_cast<int64_t>(kTileCols);
  compute_tile<MmaConfig<float, kSplitTf32>, LayoutA, wmma::row_major>(shared, weights, rows, row0, col0, depth_size);
  for (int e = threadIdx.x; e < kTileRows * kTileCols; e += kThreads) {
    const int64_t row = row0 + e / kTileCols;
    const int64_t col = col0 + e % kTileCols;
    if (row >= out_rows || col >= out_cols) continue;
    float& target = out[row * out_cols + col];
    target = (accumulate ? target : 0.f) + shared.result[e / kTileCols][e % kTileCols];
  }
}

// *grad_bias (+)= the sum of count tile sums, in a fixed order.
__global__ void __launch_bounds__(kThreads)
    sum_tile_sums_kernel(const float* tile_sums, int64_t count, float* grad_bias, bool accumulate) {
  double partial = 0.0;
  for (int64_t t = threadIdx.x; t < count; t += kThreads) partial += tile_sums[t];
  const double total = block_sum(partial);
  if (threadIdx.x == 0) *grad_bias = static_cast<float>((accumulate ? *grad_bias : 0.0) + total);
}

BackwardPlan backward_plan(const SimilarityProblem& problem, bool bias_grad, const LaunchConfig& config) {
  return plan_backward(problem.n, problem.m, bias_grad, config.workspace_limit);
}

// u <- dL/du, v <- dL/dv, grad_bias (nullable) <- sum of W, for W given by weight(S + shift).
template <class Weight>
cudaError_t launch_backward(const SimilarityProblem& problem, const float* shift, Weight weight, float* u, float* v,
                            float* grad_bias, void* workspace, const LaunchConfig& config) {
  const bool outputs_given = problem.d == 0 || (u != nullptr && v != nullptr);  // d = 0: nothing to write
  if (!is_valid(problem) || !outputs_given || workspace == nullptr) return cudaErrorInvalidValue;
  const BackwardPlan plan = backward_plan(problem, grad_bias != nullptr, config);
  const int64_t column_tiles = ceil_div(problem.m, kTileCols);
  const int64_t depth_tiles = ceil_div(problem.d, kTileCols);
  if (depth_tiles > kMaxGridY) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  float* weights = reinterpret_cast<float*>(base + plan.weights_offset);
  float* tile_sums = grad_bias == nullptr ? nullptr : reinterpret_cast<float*>(base + plan.tile_sums_offset);

  return dispatch_input_type(problem.dtype, config.fp32_single_pass_tf32, [&](auto tag) {
    using Config = decltype(tag);
    using Input = typename Config::InputType;
    const auto* q = static_cast<const Input*>(problem.q);
    for (int64_t chunk_row0 = 0; chunk_row0 < problem.n; chunk_row0 += plan.chunk_rows) {
      const int64_t rows = std::min(plan.chunk_rows, problem.n - chunk_row0);
      const int64_t row_tiles = ceil_div(rows, kTileRows);
      const bool first_chunk = chunk_row0 == 0;
      weights_kernel<Config, Weight>
          <<<dim3(static_cast<unsigned>(column_tiles), static_cast<unsigned>(row_tiles)), kThreads, 0,
             config.stream>>>(problem, shift, weight, chunk_row0, weights, plan.weights_ld, tile_sums);
      FL_RETURN_IF_ERROR(cudaGetLastError());

      const GlobalMatrix<float> chunk_weights = make_global_matrix(weights, plan.weights_ld, rows, problem.m);
      if (depth_tiles > 0) {
        const GlobalMatrix<Input> v_rows = make_global_matrix(static_cast<const Input*>(problem.k), problem.k_row_stride,
                                                              problem.m, problem.d, problem.inv_norm_k);
        weighted_rows_kernel<Config::kSplit, wmma::row_major, Input>
            <<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(depth_tiles)), kThreads, 0,
               config.stream>>>(chunk_weights, v_rows, problem.m, u + chunk_row0 * problem.d, rows, problem.d, false);
        FL_RETURN_IF_ERROR(cudaGetLastError());

        const GlobalMatrix<Input> u_rows = make_global_matrix(q + chunk_row0 * problem.q_row_stride, problem.q_row_stride,
                                                              rows, problem.d, problem.inv_norm_q + chunk_row0);
        weighted_rows_kernel<Config::kSplit, wmma::col_major, Input>
            <<<dim3(static_cast<unsigned>(column_tiles), static_cast<unsigned>(depth_tiles)), kThreads, 0,
               config.stream>>>(chunk_weights, u_rows, rows, v, problem.m, problem.d, !first_chunk);
        FL_RETURN_IF_ERROR(cudaGetLastError());
      }
      if (grad_bias != nullptr) {
        sum_tile_sums_kernel<<<1, kThreads, 0, config.stream>>>(tile_sums, column_tiles * row_tiles, grad_bias,
                                                                !first_chunk);
        FL_RETURN_IF_ERROR(cudaGetLastError());
      }
    }
    return cudaSuccess;
  });
}

}  // namespace

size_t lse_backward_workspace_bytes(const SimilarityProblem& problem, const LaunchConfig& config) {
  return backward_plan(problem, false, config).workspace_bytes;
}

cudaError_t lse_backward(const SimilarityProblem& problem, const float* lse_row, const float* lse_col,
                         const float* grad_row, const float* grad_col, float* u, float* v, void* workspace,
                         const LaunchConfig& config) {
  if (grad_row == nullptr && grad_col == nullptr) return cudaErrorInvalidValue;
  if ((grad_row != nullptr && lse_row == nullptr) || (grad_col != nullptr && lse_col == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return launch_backward(problem, nullptr, LseWeight{lse_row, lse_col, grad_row, grad_col}, u, v, nullptr, workspace,
                         config);
}

size_t softplus_backward_workspace_bytes(const SimilarityProblem& problem, const LaunchConfig& config) {
  return backward_plan(problem, true, config).workspace_bytes;
}

cudaError_t softplus_backward(const SimilarityProblem& problem, const float* bias, const float* grad_row, float* u,
                              float* v, float* grad_bias, void* workspace, const LaunchConfig& config) {
  if (bias == nullptr || grad_row == nullptr || grad_bias == nullptr) return cudaErrorInvalidValue;
  return launch_backward(problem, bias, SoftplusWeight{grad_row}, u, v, grad_bias, workspace, config);
}

}  // namespace fused_losses
