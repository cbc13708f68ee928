// Forward kernels: row (and column) statistics of S, one tile of S at a time.
#include <algorithm>

#include "kernel_common.cuh"

namespace fused_losses {
namespace {

constexpr int kThreadsPerRow = kThreads / kTileRows;
constexpr int kColsPerThread = kTileCols / kThreadsPerRow;
constexpr int kThreadsPerCol = kThreads / kTileCols;
constexpr int kRowsPerThread = kTileRows / kThreadsPerCol;
constexpr int kFinishThreads = 256;

// One CTA: row block first_row_block + blockIdx.y against column split blockIdx.x (see
// ForwardPlan). Leaves the Reduction state of each of its rows over its columns in
// row_partials[split][row] and, when column_partials is set, the log-sum-exp state of each of its
// columns over its rows in column_partials[blockIdx.y][col]. shift (nullable) is added to S
// before the row reduction.
template <class Config, class Reduction>
__global__ void __launch_bounds__(kThreads)
    forward_stats_kernel(SimilarityProblem problem, const float* shift_ptr, int64_t first_row_block,
                         typename Reduction::State* row_partials, LseState* column_partials) {
  using Input = typename Config::InputType;
  __shared__ TileShared<Input> shared;
  __shared__ float column_factor[kTileCols];

  const int64_t row0 = (first_row_block + blockIdx.y) * kTileRows;
  const IndexRange column_tiles = split_range(ceil_div(problem.m, kTileCols), gridDim.x, blockIdx.x);
  const GlobalMatrix<Input> q = q_matrix<Input>(problem);
  const GlobalMatrix<Input> k = k_matrix<Input>(problem);
  const float scale = *problem.scale;
  const float shift = shift_ptr == nullptr ? 0.f : *shift_ptr;

  // Row pass: kThreadsPerRow threads share a row, kColsPerThread contiguous columns each.
  const int tile_row = threadIdx.x / kThreadsPerRow;
  const int first_col = (threadIdx.x % kThreadsPerRow) * kColsPerThread;
  const int64_t row = row0 + tile_row;
  const float row_factor = row < problem.n ? scale * problem.inv_norm_q[row] : 0.f;
  // Column pass: kThreadsPerCol threads share a column, kRowsPerThread contiguous rows each.
  const int tile_col = threadIdx.x / kThreadsPerCol;
  const int first_row = (threadIdx.x % kThreadsPerCol) * kRowsPerThread;

  typename Reduction::State row_state = Reduction::empty();
  for (int64_t tile = column_tiles.begin; tile < column_tiles.end; ++tile) {
    const int64_t col0 = tile * kTileCols;
    __syncthreads();  // the previous tile's epilogue is done with shared.result and column_factor
    if (threadIdx.x < kTileCols) {
      const int64_t col = col0 + threadIdx.x;
      column_factor[threadIdx.x] = col < problem.m ? problem.inv_norm_k[col] : 0.f;
    }
    compute_tile<Config, wmma::row_major, wmma::col_major>(shared, q, k, row0, col0, problem.d);

    // S in place of the raw dot products; -inf where masked or outside the matrix, which drops
    // the entry from both reductions.
    float* s_row = shared.result[tile_row];
#pragma unroll
    for (int t = 0; t < kColsPerThread; ++t) {
      const int c = first_col + t;
      const int64_t col = col0 + c;
      const bool outside = row >= problem.n || col >= problem.m;
      s_row[c] = similarity_entry(row_factor, column_factor[c], s_row[c],
                                  outside || is_masked(row, col, problem.has_mask, problem.diag_offset));
    }
    row_state = Reduction::merge(
        row_state, Reduction::template of_values<kColsPerThread>([&](int t) { return s_row[first_col + t] + shift; }));

    if (column_partials != nullptr) {
      __syncthreads();  // the whole S tile is written
      LseState col_state = lse_of_values<kRowsPerThread>([&](int t) { return shared.result[first_row + t][tile_col]; });
#pragma unroll
      for (int lanes = 1; lanes < kThreadsPerCol; lanes *= 2) col_state = lse_merge(col_state, shuffle_xor(col_state, lanes));
      const int64_t col = col0 + tile_col;
      if (threadIdx.x % kThreadsPerCol == 0 && col < problem.m) column_partials[blockIdx.y * problem.m + col] = col_state;
    }
  }

#pragma unroll
  for (int lanes = 1; lanes < kThreadsPerRow; lanes *= 2) row_state = Reduction::merge(row_state, shuffle_xor(row_state, lanes));
  if (threadIdx.x % kThreadsPerRow == 0 && row < problem.n) row_partials[blockIdx.x * problem.n + row] = row_state;
}

// out[row] = the Reduction of row's partial states over the column splits, in split order.
template <class Reduction>
__global__ void finish_rows_kernel(const typename Reduction::State* partials, int64_t splits, int64_t n, float* out) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= n) return;
  typename Reduction::State state = Reduction::empty();
  for (int64_t split = 0; split < splits; ++split) state = Reduction::merge(state, partials[split * n + row]);
  out[row] = Reduction::finish(state);
}

// Folds one launch's column partials, in row-block order, into the running column states
// (starting from empty on the first launch); on the last launch writes lse_col instead.
__global__ void fold_column_partials_kernel(const LseState* partials, int64_t row_blocks, int64_t m,
                                            LseState* states, bool first_launch, float* lse_col) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= m) return;
  LseState state = first_launch ? lse_empty() : states[col];
  for (int64_t block = 0; block < row_blocks; ++block) state = lse_merge(state, partials[block * m + col]);
  if (lse_col != nullptr) {
    lse_col[col] = lse_finish(state);
  } else {
    states[col] = state;
  }
}

template <class Reduction>
ForwardPlan forward_plan(const SimilarityProblem& problem, bool with_columns, const LaunchConfig& config) {
  return plan_forward(problem.n, problem.m, with_columns, sizeof(typename Reduction::State), config.num_sms,
                      config.workspace_limit);
}

// row_out (n) <- Reduction of S + shift over each row; col_out (m, nullable) <- column lse.
template <class Reduction>
cudaError_t launch_forward(const SimilarityProblem& problem, const float* shift, float* row_out, float* col_out,
                           void* workspace, const LaunchConfig& config) {
  if (!is_valid(problem) || row_out == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const ForwardPlan plan = forward_plan<Reduction>(problem, col_out != nullptr, config);
  char* base = static_cast<char*>(workspace);
  auto* row_partials = reinterpret_cast<typename Reduction::State*>(base + plan.row_partials_offset);
  LseState* column_partials =
      col_out == nullptr ? nullptr : reinterpret_cast<LseState*>(base + plan.column_partials_offset);
  auto* column_states = reinterpret_cast<LseState*>(base + plan.column_states_offset);

  return dispatch_input_type(problem.dtype, config.fp32_single_pass_tf32, [&](auto tag) {
    using Config = decltype(tag);
    for (int64_t first = 0; first < plan.row_blocks; first += plan.row_blocks_per_launch) {
      const int64_t row_blocks = std::min(plan.row_blocks_per_launch, plan.row_blocks - first);
      forward_stats_kernel<Config, Reduction>
          <<<dim3(static_cast<unsigned>(plan.column_splits), static_cast<unsigned>(row_blocks)), kThreads, 0,
             config.stream>>>(problem, shift, first, row_partials, column_partials);
      FL_RETURN_IF_ERROR(cudaGetLastError());
      if (col_out != nullptr) {
        const bool last_launch = first + row_blocks >= plan.row_blocks;
        fold_column_partials_kernel<<<static_cast<unsigned>(ceil_div(problem.m, kFinishThreads)), kFinishThreads, 0,
                                      config.stream>>>(column_partials, row_blocks, problem.m, column_states,
                                                       first == 0, last_launch ? col_out : nullptr);
        FL_RETURN_IF_ERROR(cudaGetLastError());
      }
    }
    finish_rows_kernel<Reduction><<<static_cast<unsigned>(ceil_div(problem.n, kFinishThreads)), kFinishThreads, 0,
                                    config.stream>>>(row_partials, plan.column_splits, problem.n, row_out);
    return cudaGetLastError();
  });
}

// The column statistics of S are the row statistics of S^T = K Q^T, whose mask is S^T[j, j - offset].
SimilarityProblem transposed(const SimilarityProblem& problem) {
  SimilarityProblem t = problem;
  std::swap(t.q, t.k);
  std::swap(t.q_row_stride, t.k_row_stride);
  std::swap(t.n, t.m);
  std::swap(t.inv_norm_q, t.inv_norm_k);
  t.diag_offset = -problem.diag_offset;
  return t;
}

}  // namespace

// Column statistics alone come from the transposed problem's rows: one exp per entry instead of two.
size_t lse_forward_workspace_bytes(const SimilarityProblem& problem, bool want_rows, bool want_cols,
                                   const LaunchConfig& config) {
  return want_rows ? forward_plan<LseReduction>(problem, want_cols, config).workspace_bytes
                   : forward_plan<LseReduction>(transposed(problem), false, config).workspace_bytes;
}

cudaError_t lse_forward(const SimilarityProblem& problem, float* lse_row, float* lse_col, void* workspace,
                        const LaunchConfig& config) {
  if (lse_row == nullptr) return launch_forward<LseReduction>(transposed(problem), nullptr, lse_col, nullptr, workspace, config);
  return launch_forward<LseReduction>(problem, nullptr, lse_row, lse_col, workspace, config);
}

size_t softplus_forward_workspace_bytes(const SimilarityProblem& problem, const LaunchConfig& config) {
  return forward_plan<SoftplusReduction>(problem, false, config).workspace_bytes;
}

cudaError_t softplus_forward(const SimilarityProblem& problem, const float* bias, float* sp_row, void* workspace,
                             const LaunchConfig& config) {
  if (bias == nullptr) return cudaErrorInvalidValue;
  return launch_forward<SoftplusReduction>(problem, bias, sp_row, nullptr, workspace, config);
}

}  // namespace fused_losses
