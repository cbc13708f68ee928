// Forward statistics of S: row log-sum-exps or softplus sums and column log-sum-exps, one tile
// of S at a time, in log2 units on the accumulator fragments.
#include <algorithm>

#include "kernel_common.cuh"

namespace fused_losses {
namespace {

constexpr int kFinishThreads = 256;

// Row reductions of the forward pass over S2 (log2 units), as objects built from the kernel's
// shift pointer. reduce_tile_row gives, for the thread's row i, the state of the tile's entries
// held by the thread's quad (the 4 lanes of a fragment row), the same in all 4 lanes.
__device__ __forceinline__ float quad_sum(float value) {
#pragma unroll
  for (int lanes = 1; lanes < 4; lanes *= 2) value += shuffle_xor(value, lanes);
  return value;
}

struct LseRows {
  using State = LseState;
  static constexpr bool kColumnStatistics = true;
  static constexpr bool kLabelMask = true;
  __device__ static LseRows make(const float* /*shift*/) { return {}; }
  static FL_HOST_DEVICE State empty() { return lse_empty(); }
  static FL_HOST_DEVICE State merge(State a, State b) { return lse_merge(a, b); }
  static FL_HOST_DEVICE float finish(State state) { return lse_finish(state); }

  // The quad's row max by shuffles, then one exponential per entry against it.
  __device__ State reduce_tile_row(const TileAccumulator& acc, int i) const {
    float max = kNegInf;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) max = nan_max(max, acc.at(i, j));
#pragma unroll
    for (int lanes = 1; lanes < 4; lanes *= 2) max = nan_max(max, shuffle_xor(max, lanes));
    const float shift = max == kNegInf ? 0.f : max;  // a row of -inf only sums to 0
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) sum += fast_exp2(acc.at(i, j) - shift);
    return {max, quad_sum(sum)};
  }
};

// sum_j softplus(S_ij + bias), summed in units of ln 2.
struct SoftplusRows {
  using State = float;
  static constexpr bool kColumnStatistics = false;
  static constexpr bool kLabelMask = false;
  float shift2;  // bias * log2(e)
  __device__ static SoftplusRows make(const float* shift) { return {*shift * kLog2E}; }
  static FL_HOST_DEVICE State empty() { return 0.f; }
  static FL_HOST_DEVICE State merge(State a, State b) { return a + b; }
  static FL_HOST_DEVICE float finish(State state) { return state * kLn2; }

  __device__ State reduce_tile_row(const TileAccumulator& acc, int i) const {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) sum += softplus2(acc.at(i, j) + shift2);
    return quad_sum(sum);
  }
};

// The forward's work on each tile of one CTA's row block: S2 from the accumulators (with kLabels,
// label-masked), then the tile's row states merged into the running ones and, with kColumns, the
// tile's column log-sum-exp states. (Rows are always reduced: a call for column statistics alone
// is rare and pays one exponential more per entry.)
// The running row states live in shared memory, one per (warp column, row), kept by the first
// lane of the row's quad: no registers are held across tiles.
template <class Reduction, bool kColumns, bool kLabels>
class ForwardEpilogue {
 public:
  using State = typename Reduction::State;

  // column_partials: this row block's row of column states (with kColumns).
  __device__ ForwardEpilogue(const SimilarityProblem& problem, Reduction reduction, int64_t row0,
                             LseState* column_partials)
      : problem_(problem), reduction_(reduction), row0_(row0), column_partials_(column_partials) {
    const float scale_log2 = *problem.scale * kLog2E;
    vectors().stage_rows(row0, [&](int64_t row) {
      return Factor{row_similarity_factor(scale_log2, problem.inv_norm_q, row, problem.n)};
    });
    MaskLabels<kLabels>::stage_rows(problem, row0);
    if (ThreadTile::lane() % 4 == 0) {
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) running_state(i) = Reduction::empty();
    }
  }

  __device__ void stage_columns(int buffer, int64_t col0) {
    vectors().stage_columns(buffer, col0,
                            [&](int64_t col) { return Factor{col < problem_.m ? problem_.inv_norm_k[col] : 0.f}; });
    MaskLabels<kLabels>::stage_columns(problem_, buffer, col0);
  }

  __device__ void tile(TileAccumulator& acc, int64_t col0, int buffer) {
    const ThreadTile thread = ThreadTile::current();
    similarity_log2(acc, thread, vectors().rows, vectors().columns[buffer],
                    thread.mask<kLabels>(problem_, row0_, col0, buffer), row0_, col0);
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
      const State state = reduction_.reduce_tile_row(acc, i);
      if (ThreadTile::lane() % 4 == 0) running_state(i) = Reduction::merge(running_state(i), state);
    }
    if constexpr (kColumns) column_statistics(acc, col0);
  }

  // row_partials[row] <- the state of each row of the block over the CTA's columns, merged over
  // the warps of the row in warp order. Call after the sweep.
  __device__ void finish_rows(State* row_partials) const {
    __syncthreads();
    const int r = static_cast<int>(threadIdx.x);
    if (r < kTileRows && row0_ + r < problem_.n) {
      State state = Reduction::empty();
      for (int w = 0; w < kWarpsPerRow; ++w) state = Reduction::merge(state, row_states()[w][r]);
      row_partials[row0_ + r] = state;
    }
  }

 private:
  struct Factor {
    float factor;
  };
  __device__ static StagedVectors<Factor, Factor>& vectors() {
    __shared__ StagedVectors<Factor, Factor> staged;
    return staged;
  }
  __device__ static State (&row_states())[kWarpsPerRow][kTileRows] {
    __shared__ State states[kWarpsPerRow][kTileRows];
    return states;
  }
  // The running state of the thread's row i over its warp's columns (kept by lane t = 0 of the quad).
  __device__ static State& running_state(int i) {
    return row_states()[ThreadTile::warp_col()][ThreadTile::current().row(i)];
  }

  // The tile's column states over the block's rows: a column max over the CTA (lanes by shuffles,
  // warps through shared memory), then one exponential per entry against it.
  __device__ void column_statistics(const TileAccumulator& acc, int64_t col0) const {
    constexpr int kWarpsPerCol = kTileRows / kWarpRows;
    __shared__ float column_max[kWarpsPerCol][kTileCols];
    __shared__ float column_sum[kWarpsPerCol][kTileCols];
    const ThreadTile thread = ThreadTile::current();
    const int warp_row = ThreadTile::warp_row();
    const bool first_of_column = ThreadTile::lane() / 4 == 0;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      float max = kNegInf;
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) max = nan_max(max, acc.at(i, j));
#pragma unroll
      for (int lanes = 4; lanes < 32; lanes *= 2) max = nan_max(max, shuffle_xor(max, lanes));
      if (first_of_column) column_max[warp_row][thread.col(j)] = max;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      float max = kNegInf;
#pragma unroll
      for (int w = 0; w < kWarpsPerCol; ++w) max = nan_max(max, column_max[w][thread.col(j)]);
      const float shift = max == kNegInf ? 0.f : max;  // a column of -inf only sums to 0
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) sum += fast_exp2(acc.at(i, j) - shift);
#pragma unroll
      for (int lanes = 4; lanes < 32; lanes *= 2) sum += shuffle_xor(sum, lanes);
      if (first_of_column) column_sum[warp_row][thread.col(j)] = sum;
    }
    __syncthreads();
    const int c = static_cast<int>(threadIdx.x);
    if (c < kTileCols && col0 + c < problem_.m) {
      LseState state{kNegInf, 0.f};
      for (int w = 0; w < kWarpsPerCol; ++w) {
        state.max = nan_max(state.max, column_max[w][c]);
        state.sum += column_sum[w][c];
      }
      column_partials_[col0 + c] = state;
    }
  }

  const SimilarityProblem& problem_;
  Reduction reduction_;
  int64_t row0_;
  LseState* column_partials_;
};

// One CTA: row block first_row_block + blockIdx.y against the column tiles of split blockIdx.x
// (see ForwardPlan). Leaves the Reduction state of each of its rows over its columns in
// row_partials[split][row] and, with kColumns, the log-sum-exp state of each column over its
// rows in column_partials[blockIdx.y][col]. shift (nullable) is read by Reduction::make. kLabels:
// the problem has a label mask.
template <class Config, class Reduction, bool kColumns, bool kLabels>
__global__ void __launch_bounds__(kThreads, Config::kMinCtasPerSm)
    forward_kernel(SimilarityProblem problem, const float* shift, ColumnSplit split, int64_t first_row_block,
                   typename Reduction::State* row_partials, LseState* column_partials) {
  const int64_t row0 = (first_row_block + blockIdx.y) * kTileRows;
  ForwardEpilogue<Reduction, kColumns, kLabels> epilogue(problem, Reduction::make(shift), row0,
                                                kColumns ? column_partials + blockIdx.y * problem.m : nullptr);
  sweep_column_tiles<Config>(problem, row0, split_tiles(split, static_cast<int>(blockIdx.x)), epilogue);
  epilogue.finish_rows(row_partials + blockIdx.x * problem.n);
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

// row_out (n, nullable) <- Reduction of S over each row; col_out (m, nullable) <- column lse.
template <class Reduction>
cudaError_t launch_forward(const SimilarityProblem& problem, const float* shift, float* row_out, float* col_out,
                           void* workspace, const LaunchConfig& config) {
  if (!is_valid(problem) || (row_out == nullptr && col_out == nullptr) || workspace == nullptr ||
      (col_out != nullptr && !Reduction::kColumnStatistics) || (has_labels(problem) && !Reduction::kLabelMask)) {
    return cudaErrorInvalidValue;
  }
  const bool want_cols = col_out != nullptr;
  const ForwardPlan plan = forward_plan<Reduction>(problem, want_cols, config);
  char* base = static_cast<char*>(workspace);
  auto* row_partials = reinterpret_cast<typename Reduction::State*>(base + plan.row_partials_offset);
  auto* column_partials = reinterpret_cast<LseState*>(base + plan.column_partials_offset);
  auto* column_states = reinterpret_cast<LseState*>(base + plan.column_states_offset);

  return dispatch_input_type(problem.dtype, config.fp32_single_pass_tf32, [&](auto tag) {
    using Config = decltype(tag);
    auto* kernel = forward_kernel<Config, Reduction, false, false>;
    if constexpr (Reduction::kColumnStatistics) {
      if (want_cols) kernel = forward_kernel<Config, Reduction, true, false>;
    }
    if constexpr (Reduction::kLabelMask) {
      if (has_labels(problem)) {
        kernel = want_cols ? forward_kernel<Config, Reduction, true, true> : forward_kernel<Config, Reduction, false, true>;
      }
    }
    int ctas_per_sm = 0;
    FL_RETURN_IF_ERROR(prepare_pipeline_kernel(kernel, &ctas_per_sm));
    // One split count for every launch: the row partials of all rows are merged alike.
    const int64_t splits = column_splits_for(plan.row_blocks_per_launch, ceil_div(problem.m, kTileCols),
                                             int64_t{config.num_sms} * std::min(ctas_per_sm, kMaxCtasPerSm));
    for (int64_t first = 0; first < plan.row_blocks; first += plan.row_blocks_per_launch) {
      const int64_t row_blocks = std::min(plan.row_blocks_per_launch, plan.row_blocks - first);
      kernel<<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(row_blocks)), kThreads, kDynamicSharedBytes,
               config.stream>>>(problem, shift, column_tiles_split(problem.m, splits), first, row_partials,
                                column_partials);
      FL_RETURN_IF_ERROR(cudaGetLastError());
      if (want_cols) {
        const bool last_launch = first + row_blocks >= plan.row_blocks;
        fold_column_partials_kernel<<<static_cast<unsigned>(ceil_div(problem.m, kFinishThreads)), kFinishThreads, 0,
                                      config.stream>>>(column_partials, row_blocks, problem.m, column_states,
                                                       first == 0, last_launch ? col_out : nullptr);
        FL_RETURN_IF_ERROR(cudaGetLastError());
      }
    }
    if (row_out != nullptr) {
      finish_rows_kernel<Reduction><<<static_cast<unsigned>(ceil_div(problem.n, kFinishThreads)), kFinishThreads, 0,
                                      config.stream>>>(row_partials, splits, problem.n, row_out);
      FL_RETURN_IF_ERROR(cudaGetLastError());
    }
    return cudaSuccess;
  });
}

}  // namespace

size_t lse_forward_workspace_bytes(const SimilarityProblem& problem, bool want_rows, bool want_cols,
                                   const LaunchConfig& config) {
  return want_rows || want_cols ? forward_plan<LseRows>(problem, want_cols, config).workspace_bytes : 0;
}

cudaError_t lse_forward(const SimilarityProblem& problem, float* lse_row, float* lse_col, void* workspace,
                        const LaunchConfig& config) {
  return launch_forward<LseRows>(problem, nullptr, lse_row, lse_col, workspace, config);
}

size_t softplus_forward_workspace_bytes(const SimilarityProblem& problem, const LaunchConfig& config) {
  return forward_plan<SoftplusRows>(problem, false, config).workspace_bytes;
}

cudaError_t softplus_forward(const SimilarityProblem& problem, const float* bias, float* sp_row, void* workspace,
                             const LaunchConfig& config) {
  if (bias == nullptr || sp_row == nullptr) return cudaErrorInvalidValue;
  return launch_forward<SoftplusRows>(problem, bias, sp_row, nullptr, workspace, config);
}

}  // namespace fused_losses
