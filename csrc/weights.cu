// The backward's fused kernel: rows of W~_ij = row_scale_i col_scale_j dL/dS_ij, one tile of S at
// a time, recomputed with the forward's tile routine (so the same S, bit for bit). The products
// with W~ run elsewhere (fused_losses/backends/chunked_backward.py, vendor GEMMs).
#include <algorithm>
#include <type_traits>

#include "kernel_common.cuh"

namespace fused_losses {
namespace {

// The weights' per-row and per-column terms, staged in shared memory by the epilogue (Row and
// Column end with the S2 factor that similarity_log2 reads: the weights pass loads the terms
// before it), and W~ of one entry from them.
// A row outside the chunk, or a column outside the matrix, gets all-zero terms.

// W_ij = grad_row_i exp(S_ij - lse_row_i) + grad_col_j exp(S_ij - lse_col_j); a direction whose
// grad pointer is null is absent.
struct SoftmaxWeights {
  static constexpr bool kSumsWeights = false;
  static constexpr bool kLabelMask = true;
  const float* lse_row;
  const float* lse_col;
  const float* grad_row;
  const float* grad_col;

  struct Row {
    float lse2;       // lse_row_i log2(e)
    float row_term;   // row_scale_i grad_row_i
    float row_scale;  // row_scale_i
    float factor;     // scale log2(e) inv_norm_q[i]
  };
  struct Column {
    float lse2;       // lse_col_j log2(e)
    float col_term;   // col_scale_j grad_col_j
    float col_scale;  // col_scale_j
    float factor;     // inv_norm_k[j]
  };

  __device__ Row row(int64_t i, float s2_factor, float row_scale) const {
    if (grad_row == nullptr) return {0.f, 0.f, row_scale, s2_factor};
    return {lse_row[i] * kLog2E, row_scale * grad_row[i], row_scale, s2_factor};
  }
  __device__ Column column(int64_t j, float inv_norm, float col_scale) const {
    if (grad_col == nullptr) return {0.f, 0.f, col_scale, inv_norm};
    return {lse_col[j] * kLog2E, col_scale * grad_col[j], col_scale, inv_norm};
  }
  // W~ of an entry; a masked one (s2 = -inf) is 0 without an exponential (its row may be
  // entirely masked: lse = -inf).
  __device__ float scaled(float s2, const Row& r, const Column& c) const {
    if (s2 == kNegInf) return 0.f;
    float w = 0.f;
    if (grad_row != nullptr) w = c.col_scale * r.row_term * fast_exp2(s2 - r.lse2);
    if (grad_col != nullptr) w += r.row_scale * c.col_term * fast_exp2(s2 - c.lse2);
    return w;
  }
};

// W_ij = grad_row_i sigmoid(S_ij + bias); the kernel also sums W (unscaled) for grad_bias.
struct SigmoidWeights {
  static constexpr bool kSumsWeights = true;
  static constexpr bool kLabelMask = false;
  const float* bias;
  const float* grad_row;

  struct Row {
    float grad;    // grad_row_i
    float scaled;  // row_scale_i grad_row_i
    float factor;  // scale log2(e) inv_norm_q[i]
  };
  struct Column {
    float col_scale;  // col_scale_j
    float factor;     // inv_norm_k[j]
  };

  __device__ Row row(int64_t i, float s2_factor, float row_scale) const {
    return {grad_row[i], row_scale * grad_row[i], s2_factor};
  }
  __device__ Column column(int64_t /*j*/, float inv_norm, float col_scale) const { return {col_scale, inv_norm}; }
  // shift2 = bias * log2(e)
  __device__ float shift2() const { return *bias * kLog2E; }
};

template <class Out>
__device__ __forceinline__ void store_pair(Out* target, float lo, float hi) {
  if constexpr (std::is_same<Out, float>::value) {
    *reinterpret_cast<float2*>(target) = float2{lo, hi};
  } else {
    *reinterpret_cast<uint32_t*>(target) = pack_pair<Out>(lo, hi);
  }
}

// The weights kernel's work on each tile of one CTA's row block: S2 from the accumulators (with
// kLabels, label-masked), then W~ for the entries in rows [chunk.row_start, chunk.row_stop),
// stored in pairs of adjacent columns; with Weights::kSumsWeights, a running sum of the unscaled W.
template <class Input, class Weights, bool kLabels>
class WeightsEpilogue {
 public:
  using Row = typename Weights::Row;
  using Column = typename Weights::Column;

  __device__ WeightsEpilogue(const SimilarityProblem& problem, const Weights& weights, const WeightsChunk& chunk,
                             int64_t row0)
      : problem_(problem), weights_(weights), chunk_(chunk), row0_(row0) {
    const float scale_log2 = *problem.scale * kLog2E;
    vectors().stage_rows(row0, [&](int64_t row) {
      if (row < chunk.row_start || row >= chunk.row_stop) return Row{};
      return weights_.row(row, row_similarity_factor(scale_log2, problem.inv_norm_q, row, problem.n),
                          chunk.row_scale[row - chunk.row_start]);
    });
    MaskLabels<kLabels>::stage_rows(problem, row0);
    if (threadIdx.x < kTileRows) {
      const int64_t row = row0 + threadIdx.x;
      const bool in_chunk = row >= chunk.row_start && row < chunk.row_stop;
      out_rows()[threadIdx.x] =
          in_chunk ? static_cast<Input*>(chunk.out) + (row - chunk.row_start) * chunk.out_row_stride : nullptr;
    }
  }

  __device__ void stage_columns(int buffer, int64_t col0) {
    vectors().stage_columns(buffer, col0, [&](int64_t col) {
      return col < problem_.m ? weights_.column(col, problem_.inv_norm_k[col], chunk_.col_scale[col]) : Column{};
    });
    MaskLabels<kLabels>::stage_columns(problem_, buffer, col0);
  }

  __device__ void tile(TileAccumulator& acc, int64_t col0, int buffer) {
    const ThreadTile thread = ThreadTile::current();
    const auto mask = thread.mask<kLabels>(problem_, row0_, col0, buffer);
    const Row* rows = vectors().rows;
    const Column* columns = vectors().columns[buffer];
    similarity_log2(acc, thread, rows, columns, mask, row0_, col0);
    const bool paired = reinterpret_cast<uintptr_t>(chunk_.out) % (2 * sizeof(Input)) == 0 &&
                        chunk_.out_row_stride % 2 == 0;
    float shift2 = 0.f;
    if constexpr (Weights::kSumsWeights) shift2 = weights_.shift2();
    // Two passes over the rows, one per half of the thread's columns: fewer column terms and
    // accumulators live at once.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) {
        Input* const out_row = out_rows()[thread.row(i)];
        if (out_row == nullptr) continue;  // outside the chunk
        const Row terms = rows[thread.row(i)];
        Input* out = out_row + col0 + thread.col_base;
        float sigmoid_sum = 0.f;
#pragma unroll
        for (int pair = half * kThreadCols / 4; pair < (half + 1) * kThreadCols / 4; ++pair) {
          float w[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = 2 * pair + e;
            const Column& column = columns[thread.col(j)];
            if constexpr (Weights::kSumsWeights) {
              const float sigmoid = sigmoid2(acc.at(i, j) + shift2);  // 0 where masked or outside
              w[e] = terms.scaled * column.col_scale * sigmoid;
              sigmoid_sum += sigmoid;
            } else {
              w[e] = weights_.scaled(acc.at(i, j), terms, column);
            }
          }
          const int c = ThreadTile::col_offset(2 * pair);  // of the pair's first column, from col_base
          if (paired && c + 1 < mask.cols_left) {
            store_pair(out + c, w[0], w[1]);
          } else {
            if (c < mask.cols_left) out[c] = static_cast<Input>(w[0]);
            if (c + 1 < mask.cols_left) out[c + 1] = static_cast<Input>(w[1]);
          }
        }
        if constexpr (Weights::kSumsWeights) weight_sum_ += terms.grad * sigmoid_sum;
      }
    }
  }

  __device__ float weight_sum() const { return weight_sum_; }

 private:
  __device__ static StagedVectors<Row, Column>& vectors() {
    __shared__ StagedVectors<Row, Column> staged;
    return staged;
  }
  // Per row of the block: where its weights go, or null outside the chunk (staged in shared
  // memory, like the other row values, rather than held in registers across the sweep).
  __device__ static Input** out_rows() {
    __shared__ Input* rows[kTileRows];
    return rows;
  }

  const SimilarityProblem& problem_;
  const Weights& weights_;
  const WeightsChunk& chunk_;
  int64_t row0_;
  float weight_sum_ = 0.f;
};

// One CTA: row block first_row_block + blockIdx.y (of the whole matrix, so that every tile of S
// is the forward's) against the column tiles of split blockIdx.x. With Weights::kSumsWeights, leaves the CTA's
// sum of W in weight_sums[blockIdx.y * gridDim.x + blockIdx.x]. kLabels: the problem has a label mask.
template <class Config, class Weights, bool kLabels>
__global__ void __launch_bounds__(kThreads, Config::kMinCtasPerSm)
    weights_kernel(SimilarityProblem problem, Weights weights, WeightsChunk chunk, ColumnSplit split,
                   int64_t first_row_block, float* weight_sums) {
  using Input = typename Config::InputType;
  const int64_t row0 = (first_row_block + blockIdx.y) * kTileRows;
  WeightsEpilogue<Input, Weights, kLabels> epilogue(problem, weights, chunk, row0);
  sweep_column_tiles<Config>(problem, row0, split_tiles(split, static_cast<int>(blockIdx.x)), epilogue);
  if constexpr (Weights::kSumsWeights) {
    const float sum = block_sum(epilogue.weight_sum());
    if (threadIdx.x == 0) weight_sums[blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x] = sum;
  }
}

// *total = the sum of count partial sums, in order, in double.
__global__ void sum_partials_kernel(const float* partials, int64_t count, float* total) {
  double sum = 0.0;
  for (int64_t t = 0; t < count; ++t) sum += partials[t];
  *total = static_cast<float>(sum);
}

inline WeightsPlan weights_plan(const SimilarityProblem& problem, const WeightsChunk& chunk, int64_t resident_ctas) {
  return plan_weights(problem.m, chunk.row_start, chunk.row_stop, resident_ctas);
}

template <class Weights>
bool is_valid(const SimilarityProblem& problem, const WeightsChunk& chunk) {
  return is_valid(problem) && (Weights::kLabelMask || !has_labels(problem)) && chunk.out != nullptr &&
         chunk.row_scale != nullptr && chunk.col_scale != nullptr && 0 <= chunk.row_start &&
         chunk.row_start < chunk.row_stop && chunk.row_stop <= problem.n && chunk.out_row_stride >= problem.m &&
         ceil_div(chunk.row_stop, kTileRows) - chunk.row_start / kTileRows <= kMaxGridY;
}

template <class Weights>
cudaError_t launch_weights(const SimilarityProblem& problem, const Weights& weights, const WeightsChunk& chunk,
                           float* weight_sum, void* workspace, const LaunchConfig& config) {
  return dispatch_input_type(problem.dtype, config.fp32_single_pass_tf32, [&](auto tag) {
    using Config = decltype(tag);
    auto* kernel = weights_kernel<Config, Weights, false>;
    if constexpr (Weights::kLabelMask) {
      if (has_labels(problem)) kernel = weights_kernel<Config, Weights, true>;
    }
    int ctas_per_sm = 0;
    FL_RETURN_IF_ERROR(prepare_pipeline_kernel(kernel, &ctas_per_sm));
    const WeightsPlan grid =
        weights_plan(problem, chunk, int64_t{config.num_sms} * std::min(ctas_per_sm, kMaxCtasPerSm));
    auto* partials = static_cast<float*>(workspace);
    kernel<<<dim3(static_cast<unsigned>(grid.splits), static_cast<unsigned>(grid.row_blocks)), kThreads,
             kDynamicSharedBytes, config.stream>>>(problem, weights, chunk, column_tiles_split(problem.m, grid.splits),
                                                   grid.first_row_block, partials);
    FL_RETURN_IF_ERROR(cudaGetLastError());
    if constexpr (Weights::kSumsWeights) {
      sum_partials_kernel<<<1, 1, 0, config.stream>>>(partials, grid.splits * grid.row_blocks, weight_sum);
      FL_RETURN_IF_ERROR(cudaGetLastError());
    }
    return cudaSuccess;
  });
}

}  // namespace

cudaError_t lse_weights(const SimilarityProblem& problem, const float* lse_row, const float* lse_col,
                        const float* grad_row, const float* grad_col, const WeightsChunk& chunk,
                        const LaunchConfig& config) {
  if (!is_valid<SoftmaxWeights>(problem, chunk) || (grad_row == nullptr && grad_col == nullptr) ||
      (grad_row != nullptr && lse_row == nullptr) || (grad_col != nullptr && lse_col == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return launch_weights(problem, SoftmaxWeights{lse_row, lse_col, grad_row, grad_col}, chunk, nullptr, nullptr,
                        config);
}

size_t softplus_weights_workspace_bytes(const SimilarityProblem& problem, const WeightsChunk& chunk,
                                        const LaunchConfig& config) {
  const WeightsPlan grid = weights_plan(problem, chunk, int64_t{config.num_sms} * kMaxCtasPerSm);
  return align_up(static_cast<size_t>(grid.splits * grid.row_blocks) * sizeof(float));
}

cudaError_t softplus_weights(const SimilarityProblem& problem, const float* bias, const float* grad_row,
                             const WeightsChunk& chunk, float* weight_sum, void* workspace,
                             const LaunchConfig& config) {
  if (!is_valid<SigmoidWeights>(problem, chunk) || bias == nullptr || grad_row == nullptr || weight_sum == nullptr ||
      workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch_weights(problem, SigmoidWeights{bias, grad_row}, chunk, weight_sum, workspace, config);
}

}  // namespace fused_losses
