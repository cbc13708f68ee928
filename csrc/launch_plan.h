// Tile shape of the fused kernels, and the host-side plans: grid shapes and workspace layouts.
// Plain C++ (no CUDA), unit-tested on the host.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "similarity_math.h"

namespace fused_losses {

// One CTA computes kTileRows x kTileCols tiles of S = Q K^T with 8 warps of kWarpRows x
// kWarpCols each. The reduction over D runs in stages of kStageRowBytes bytes of every row of Q
// and K (64 elements of fp16 / bf16, 32 of fp32), kStages stages in flight.
constexpr int kTileRows = 128;
constexpr int kTileCols = 128;
constexpr int kWarpRows = 64;
constexpr int kWarpCols = 32;
constexpr int kWarpsPerRow = kTileCols / kWarpCols;  // warps side by side along a tile row
constexpr int kThreads = 32 * (kTileRows / kWarpRows) * kWarpsPerRow;
constexpr int kStageRowBytes = 128;
constexpr int kStages = 3;
// The staged operands, in dynamic shared memory: kStages x (Q tile + K tile), 128-byte aligned.
constexpr int kStageBytes = (kTileRows + kTileCols) * kStageRowBytes;
constexpr int kDynamicSharedBytes = kStages * kStageBytes + 128;
// At most this many CTAs per SM are counted on: the 16-bit kernels promise it to the compiler
// (__launch_bounds__: 65536 / (kThreads * 2) = 128 registers a thread), and the shared memory of
// two CTAs is all an SM has. Workspaces are sized for it; launches use the occupancy the runtime
// reports, capped at it.
constexpr int kMaxCtasPerSm = 2;

// Row strides of Q and K up to this many bytes: a thread's loads lie a 32-bit offset (under
// kTileRows strides) past its CTA's rows.
constexpr int64_t kMaxRowStrideBytes = int64_t{1} << 25;

// CUDA caps gridDim.y (row blocks of one launch) at 65535.
constexpr int64_t kMaxGridY = 65535;
// Sub-buffers of a workspace start at multiples of this many bytes.
constexpr size_t kWorkspaceAlignment = 256;

inline size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// How many CTAs share the column tiles of one row block: enough CTAs to fill every SM
// (resident_ctas = SMs x CTAs per SM) when there are few row blocks (N = 256 against M = 65536),
// never more than there are column tiles.
inline int64_t column_splits_for(int64_t row_blocks, int64_t column_tiles, int64_t resident_ctas) {
  const int64_t target = std::max<int64_t>(1, resident_ctas);
  return std::max<int64_t>(1, std::min(ceil_div(target, std::max<int64_t>(1, row_blocks)), column_tiles));
}

// Forward pass. Grid (column_splits, row blocks of the launch): each CTA sweeps its share of the
// column tiles of its row block, leaving one partial row state per row and split; with column
// statistics also one partial column state per column and row block. Launches cover at most
// row_blocks_per_launch row blocks, so that the column partials stay bounded: after each launch
// they are folded, in row-block order, into one running state per column. The row partials are
// sized for the largest split count (resident_ctas = SMs x kMaxCtasPerSm).
struct ForwardPlan {
  int64_t row_blocks;
  int64_t row_blocks_per_launch;
  size_t row_partials_offset;     // splits x n row states
  size_t column_partials_offset;  // row_blocks_per_launch x m LseState (with columns only)
  size_t column_states_offset;    // m LseState (with columns only)
  size_t workspace_bytes;
};

// n, m > 0; row_state_bytes: sizeof(the row reduction's state); workspace_limit: soft cap on the
// column partials (at least one row block's worth is always used).
inline ForwardPlan plan_forward(int64_t n, int64_t m, bool with_columns, size_t row_state_bytes, int num_sms,
                                size_t workspace_limit) {
  ForwardPlan plan{};
  plan.row_blocks = ceil_div(n, kTileRows);
  const int64_t column_partials_per_row_block = m * static_cast<int64_t>(sizeof(LseState));
  int64_t per_launch =
      with_columns ? static_cast<int64_t>(workspace_limit) / column_partials_per_row_block : plan.row_blocks;
  per_launch = std::max<int64_t>(1, std::min({per_launch, plan.row_blocks, kMaxGridY}));
  plan.row_blocks_per_launch = per_launch;
  const int64_t max_splits = column_splits_for(per_launch, ceil_div(m, kTileCols),
                                               std::max(1, num_sms) * int64_t{kMaxCtasPerSm});

  size_t offset = 0;
  plan.row_partials_offset = offset;
  offset += align_up(static_cast<size_t>(max_splits * n) * row_state_bytes);
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

// Weights pass, for rows [row_start, row_stop) of S: grid (splits, row_blocks) over the row
// blocks of the whole matrix that hold rows of the chunk (so that every tile of S is the
// forward's); each CTA sweeps its share of the column tiles like the forward. The sigmoid weights
// also leave one partial sum of W per CTA: splits x row_blocks floats of workspace.
struct WeightsPlan {
  int64_t first_row_block;
  int64_t row_blocks;
  int64_t splits;
};

// 0 <= row_start < row_stop; resident_ctas: SMs x CTAs per SM.
inline WeightsPlan plan_weights(int64_t m, int64_t row_start, int64_t row_stop, int64_t resident_ctas) {
  const int64_t first = row_start / kTileRows;
  const int64_t blocks = ceil_div(row_stop, kTileRows) - first;
  return {first, blocks, column_splits_for(blocks, ceil_div(m, kTileCols), resident_ctas)};
}

}  // namespace fused_losses
