// Tile shape of every kernel, and the host-side plans: grid shapes, chunking and the workspace
// layout of each primitive. Plain C++ (no CUDA), unit-tested on the host.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "similarity_math.h"

namespace fused_losses {

// One CTA computes a kTileRows x kTileCols tile of a product, kTileDepth along the reduction
// dimension per shared-memory stage, with 4 warps of 32 x 32 each.
constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kTileDepth = 32;
constexpr int kThreads = 128;

// CUDA caps gridDim.y (row blocks of one launch) at 65535.
constexpr int64_t kMaxGridY = 65535;
// Forward: aim for this many CTAs per SM per launch, splitting the columns of a row block
// between CTAs when there are too few row blocks to fill the GPU.
constexpr int64_t kForwardCtasPerSm = 8;
// Sub-buffers of a workspace start at multiples of this many bytes.
constexpr size_t kWorkspaceAlignment = 256;

inline size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// Forward pass. Grid (column_splits, row blocks of the launch): each CTA reduces its row block
// over its share of the column tiles, leaving one partial state per row and split; with column
// statistics it also leaves one partial log-sum-exp state per column and row block. Launches
// cover at most row_blocks_per_launch row blocks, so that the column partials stay bounded:
// after each launch they are folded, in row-block order, into one running state per column.
struct ForwardPlan {
  int64_t row_blocks;
  int64_t row_blocks_per_launch;
  int64_t column_splits;
  size_t row_partials_offset;     // column_splits x n row states
  size_t column_partials_offset;  // row_blocks_per_launch x m LseState (with columns only)
  size_t column_states_offset;    // m LseState (with columns only)
  size_t workspace_bytes;
};

// n, m > 0; row_state_bytes: sizeof(Reduction::State); workspace_limit: soft cap on the column
// partials (at least one row block's worth is always used).
inline ForwardPlan plan_forward(int64_t n, int64_t m, bool with_columns, size_t row_state_bytes,
                                int num_sms, size_t workspace_limit) {
  ForwardPlan plan{};
  plan.row_blocks = ceil_div(n, kTileRows);
  const int64_t column_partials_per_row_block = m * static_cast<int64_t>(sizeof(LseState));
  int64_t per_launch = with_columns
      ? static_cast<int64_t>(workspace_limit) / column_partials_per_row_block
      : plan.row_blocks;
  per_launch = std::max<int64_t>(1, std::min({per_launch, plan.row_blocks, kMaxGridY}));
  plan.row_blocks_per_launch = per_launch;

  const int64_t column_tiles = ceil_div(m, kTileCols);
  const int64_t target_ctas = std::max<int64_t>(1, num_sms) * kForwardCtasPerSm;
  plan.column_splits = std::max<int64_t>(1, std::min(ceil_div(target_ctas, per_launch), column_tiles));

  size_t offset = 0;
  plan.row_partials_offset = offset;
  offset += align_up(static_cast<size_t>(plan.column_splits * n) * row_state_bytes);
  plan.column_partials_offset = offset;
  plan.column_states_offset = offset;
  if (with_columns) {
    offset += align_up(static_cast<size_t>(per_launch * column_partials_per_row_block));
    plan.column_states_offset = offset;
    offset += align_up(static_cast<size_t>(column_partials_per_row_block));
  }
  plan.workspace_bytes = offset;
  return plan;
}

// Backward pass, in chunks of chunk_rows rows of S: one kernel recomputes the chunk's tiles of S
// and writes scale * W (fp32, row stride weights_ld) to the workspace, then two tiled products
// read it: U[chunk] = (scale W) V and V += (scale W)^T U[chunk], where U and V hold the
// normalized rows. Softplus also leaves one partial sum of W per tile, for grad_bias.
struct BackwardPlan {
  int64_t chunk_rows;  // a multiple of kTileRows
  int64_t weights_ld;  // m rounded up to 4 floats, so that rows start 16-byte aligned
  size_t weights_offset;
  size_t tile_sums_offset;  // (chunk_rows / kTileRows) x column tiles floats (softplus only)
  size_t workspace_bytes;
};

// n, m > 0; workspace_limit: soft cap on the weights chunk (at least kTileRows rows are used).
inline BackwardPlan plan_backward(int64_t n, int64_t m, bool with_tile_sums, size_t workspace_limit) {
  BackwardPlan plan{};
  plan.weights_ld = ceil_div(m, 4) * 4;
  const int64_t row_bytes = plan.weights_ld * static_cast<int64_t>(sizeof(float));
  int64_t row_blocks = static_cast<int64_t>(workspace_limit) / row_bytes / kTileRows;
  row_blocks = std::max<int64_t>(1, std::min({row_blocks, ceil_div(n, kTileRows), kMaxGridY}));
  plan.chunk_rows = row_blocks * kTileRows;

  size_t offset = 0;
  plan.weights_offset = offset;
  offset += align_up(static_cast<size_t>(plan.chunk_rows * row_bytes));
  plan.tile_sums_offset = offset;
  if (with_tile_sums) {
    offset += align_up(static_cast<size_t>(row_blocks * ceil_div(m, kTileCols)) * sizeof(float));
  }
  plan.workspace_bytes = offset;
  return plan;
}

}  // namespace fused_losses
