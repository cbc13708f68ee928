// The one tile routine behind both fused kernels: a kTileRows x kTileCols tile of Q K^T in fp32
// on the tensor cores (mma.sync m16n8k16 for fp16 / bf16, m16n8k8 TF32 for fp32, optionally split
// into high and low TF32 parts), with both operands streamed global -> shared by cp.async through
// kStages stages of a swizzled layout and read by ldmatrix.x4. The result stays in each thread's
// accumulator fragments (TileAccumulator), where the kernels' epilogues work on it.
//
// A CTA sweeps the column tiles of one row block (sweep_column_tiles): the next tile's first
// stages are in flight while the current tile's epilogue runs. Every entry of S is the same
// function of its row of Q and column of K in every kernel and every tile position: the same
// MMAs over D in the same order, then similarity_log2. That is what makes the weights kernel's S
// bit-identical to the forward's.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch_plan.h"
#include "ptx_primitives.cuh"
#include "similarity_kernels.h"
#include "similarity_math.h"

// Test seam: the CPU emulation (host_tests/emulation/cuda_emulation.h) defines it to report every
// entry of S a kernel computes (global row, column, S in log2 units) to a hook its tests set;
// nothing on the device.
#ifndef FL_OBSERVE_SIMILARITY
#define FL_OBSERVE_SIMILARITY(row, col, s2)
#endif

namespace fused_losses {

// Compile-time choice of the product: Input is the element type of Q and K; fp32 inputs run as
// TF32, split into a high and a low part (three MMAs, about fp32 accuracy) when kSplitTf32.
// CTAs per SM the kernels promise the compiler (__launch_bounds__): 2 (128 registers a thread) for
// 16-bit inputs; fp32 inputs need registers for the TF32 conversions (and the split's low parts)
// and get 1.
template <class Input, bool kSplitTf32>
struct MmaConfig {
  static_assert(!kSplitTf32 || std::is_same<Input, float>::value, "TF32 splitting is for fp32");
  using InputType = Input;
  static constexpr bool kSplit = kSplitTf32;
  static constexpr int kMinCtasPerSm = sizeof(Input) == 2 ? kMaxCtasPerSm : 1;
};

// Warp w covers rows kWarpRows * (w / kWarpsPerRow) and columns kWarpCols * (w % kWarpsPerRow) of
// the tile, as 4 x 4 m16n8 fragments. Thread (g = lane / 4, t = lane % 4) holds the 8 x 8 entries
// (row(i), col(j)), i, j in [0, 8): rows g + 8 h of each 16-row fragment, columns 2 t + e of each
// 8-column fragment; that is row_base + row_offset(i), col_base + col_offset(j) with
// compile-time offsets.
constexpr int kFragmentsM = kWarpRows / 16;
constexpr int kFragmentsN = kWarpCols / 8;
constexpr int kThreadRows = 2 * kFragmentsM;
constexpr int kThreadCols = 2 * kFragmentsN;

// EntryMask with the label mask: bit kThreadCols * i + j of `labelled` says whether the labels
// exclude the thread's entry (i, j) of the tile (see ThreadTile). One word computed once per tile
// from the staged labels, instead of sixteen labels held through the epilogue.
struct LabelledEntryMask : EntryMask {
  uint64_t labelled;
};
static_assert(kThreadRows * kThreadCols <= 64, "one bit per entry of a thread");

template <bool kLabels>
struct MaskLabels;

struct ThreadTile {
  int row_base;  // warp row + g
  int col_base;  // warp column + 2 t

  __device__ static ThreadTile current() {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    return {kWarpRows * (warp / kWarpsPerRow) + lane / 4, kWarpCols * (warp % kWarpsPerRow) + 2 * (lane % 4)};
  }
  __device__ static constexpr int row_offset(int i) { return 16 * (i / 2) + 8 * (i % 2); }
  __device__ static constexpr int col_offset(int j) { return 8 * (j / 2) + j % 2; }
  __device__ int row(int i) const { return row_base + row_offset(i); }
  __device__ int col(int j) const { return col_base + col_offset(j); }
  __device__ static int lane() { return static_cast<int>(threadIdx.x) % 32; }
  __device__ static int warp_row() { return static_cast<int>(threadIdx.x) / 32 / kWarpsPerRow; }
  __device__ static int warp_col() { return static_cast<int>(threadIdx.x) / 32 % kWarpsPerRow; }
  // The mask of this thread's entries of the tile at (row0, col0): an EntryMask or, with kLabels,
  // a LabelledEntryMask from the labels in MaskLabels' buffer `buffer`.
  template <bool kLabels>
  __device__ auto mask(const SimilarityProblem& problem, int64_t row0, int64_t col0, int buffer) const {
    return MaskLabels<kLabels>::add(entry_mask<kTileRows>(row0 + row_base, col0 + col_base, problem.n, problem.m,
                                                          problem.has_mask, problem.diag_offset),
                                    problem, *this, buffer);
  }
  // Whether `mask` excludes the thread's entry (i, j).
  __device__ static bool excludes(const EntryMask& mask, int i, int j) {
    return mask.excludes(row_offset(i), col_offset(j));
  }
  __device__ static bool excludes(const LabelledEntryMask& mask, int i, int j) {
    return excludes(static_cast<const EntryMask&>(mask), i, j) | ((mask.labelled >> (kThreadCols * i + j)) & 1);
  }
};

// The labels of the label mask (SimilarityProblem::row_labels / col_labels) of a CTA's row block
// (staged once per block) and of its column tiles (once per tile, double-buffered by tile parity),
// in shared memory, staged next to StagedVectors and made visible by the same barriers. add()
// turns a thread's EntryMask of a tile into its LabelledEntryMask. MaskLabels<false>, the kernels
// without a label mask, stages nothing and keeps the plain EntryMask.
template <bool kLabels>
struct MaskLabels {
  __device__ static void stage_rows(const SimilarityProblem& /*problem*/, int64_t /*row0*/) {}
  __device__ static void stage_columns(const SimilarityProblem& /*problem*/, int /*buffer*/, int64_t /*col0*/) {}
  __device__ static EntryMask add(EntryMask mask, const SimilarityProblem& /*problem*/, const ThreadTile& /*thread*/,
                                  int /*buffer*/) {
    return mask;
  }
};

template <>
struct MaskLabels<true> {
  // Labels outside the matrix are never compared (the entries there are masked): they read as 0.
  __device__ static void stage_rows(const SimilarityProblem& problem, int64_t row0) {
    const int64_t row = row0 + threadIdx.x;
    if (threadIdx.x < kTileRows) staged().rows[threadIdx.x] = row < problem.n ? problem.row_labels[row] : 0;
  }
  __device__ static void stage_columns(const SimilarityProblem& problem, int buffer, int64_t col0) {
    const int64_t col = col0 + threadIdx.x;
    if (threadIdx.x < kTileCols) staged().columns[buffer][threadIdx.x] = col < problem.m ? problem.col_labels[col] : 0;
  }
  __device__ static LabelledEntryMask add(EntryMask mask, const SimilarityProblem& problem, const ThreadTile& thread,
                                          int buffer) {
    uint64_t labelled = 0;
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
      const int64_t row_label = staged().rows[thread.row(i)];
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) {
        const bool excluded =
            labels_exclude(row_label, staged().columns[buffer][thread.col(j)], problem.exclude_same_label);
        labelled |= uint64_t{excluded} << (kThreadCols * i + j);
      }
    }
    return {mask, labelled};
  }

 private:
  struct Staged {
    int64_t rows[kTileRows];
    int64_t columns[2][kTileCols];
  };
  __device__ static Staged& staged() {
    __shared__ Staged labels;
    return labels;
  }
};

struct TileAccumulator {
  float v[kFragmentsM][kFragmentsN][4];
  __device__ float& at(int i, int j) { return v[i / 2][j / 2][2 * (i % 2) + j % 2]; }
  __device__ float at(int i, int j) const { return v[i / 2][j / 2][2 * (i % 2) + j % 2]; }
};

// scale * log2(e) * inv_norm_q[i]: the row factor of S2 (0 outside the matrix).
__device__ __forceinline__ float row_similarity_factor(float scale_log2, const float* inv_norm_q, int64_t row,
                                                       int64_t n) {
  return row < n ? scale_log2 * inv_norm_q[row] : 0.f;
}

// Per-row values of a CTA's row block (staged once per block) and per-column values of its tile
// (once per tile, double-buffered by tile parity so that the next tile's can be written while the
// current tile's are read), in shared memory: the epilogues read them at fixed offsets instead
// of holding addresses and values in registers across the sweep. Row / Column are small structs
// with a member `factor`, the row or column factor of S2.
template <class Row, class Column>
struct StagedVectors {
  Row rows[kTileRows];
  Column columns[2][kTileCols];

  // The CTA's copy of the block's row values: make(row) for the kTileRows rows from row0.
  template <class Make>
  __device__ void stage_rows(int64_t row0, Make make) {
    if (threadIdx.x < kTileRows) rows[threadIdx.x] = make(row0 + threadIdx.x);
  }
  template <class Make>
  __device__ void stage_columns(int buffer, int64_t col0, Make make) {
    if (threadIdx.x < kTileCols) columns[buffer][threadIdx.x] = make(col0 + threadIdx.x);
  }
};

// The accumulators (raw dot products) become S2 = row factor * column factor * dot, or -inf where
// the mask excludes the entry. The only place S is formed, in every kernel.
template <class Row, class Column, class Mask>
__device__ __forceinline__ void similarity_log2(TileAccumulator& acc, const ThreadTile& thread, const Row* rows,
                                                const Column* columns, const Mask& mask, int64_t row0,
                                                int64_t col0) {
#pragma unroll
  for (int i = 0; i < kThreadRows; ++i) {
    const float row_factor = rows[thread.row(i)].factor;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      const bool excluded = ThreadTile::excludes(mask, i, j);
      const float s2 = excluded ? kNegInf : acc.at(i, j) * row_factor * columns[thread.col(j)].factor;
      acc.at(i, j) = s2;
      FL_OBSERVE_SIMILARITY(row0 + thread.row(i), col0 + thread.col(j), s2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Operands and the staged shared layout.

// 16-byte cp.async needs aligned rows; otherwise the stages are filled by element loads.
template <class Input>
__host__ __device__ inline bool rows_are_16_byte_aligned(const void* data, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && (row_stride * static_cast<int64_t>(sizeof(Input))) % 16 == 0;
}

// A stage holds kStageRowBytes of each of kTileRows rows of Q, then of kTileCols rows of K; the
// 16-byte chunk c of stage row r lies at chunk c ^ (r % 8) of that row, so that the 8 rows an
// ldmatrix phase (or a cp.async row) touches fall in distinct banks.
constexpr int kChunksPerRow = kStageRowBytes / 16;
static_assert(kChunksPerRow == 8, "the swizzle permutes 8 chunks per row");
static_assert(kTileRows == kTileCols, "Q and K stage rows are copied by the same passes");

__device__ __forceinline__ int stage_offset(int row, int chunk) {
  return row * kStageRowBytes + ((chunk ^ (row % 8)) << 4);
}

template <class Input>
__device__ __forceinline__ void copy_chunk_by_elements(SharedAddress dst, const unsigned char* src, int src_bytes) {
  constexpr int kElements = 16 / static_cast<int>(sizeof(Input));
  union {
    Input values[kElements];
    uint32_t words[4];
  } chunk;
#pragma unroll
  for (int e = 0; e < kElements; ++e) {
    chunk.values[e] = e * static_cast<int>(sizeof(Input)) < src_bytes ? reinterpret_cast<const Input*>(src)[e]
                                                                       : static_cast<Input>(0.f);
  }
  store_shared_16(dst, chunk.words);
}

// Where the stages start: the dynamic shared memory rounded up to 128 bytes (kDynamicSharedBytes
// has the room), so that a stage row's swizzled chunks differ only in address bits 4-6.
__device__ __forceinline__ SharedAddress pipeline_base() {
  return (shared_address(dynamic_shared_memory()) + 127) & ~SharedAddress{127};
}

// ---------------------------------------------------------------------------------------------
// The pipeline: one flattened stream of stages over the CTA's column tiles, kStages - 1 stages
// ahead of the MMAs, so that the next tile's first stages load during the current tile's
// epilogue.

template <class Config>
class TilePipeline {
 public:
  using Input = typename Config::InputType;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows one pass of the CTA copies

  // Reads everything from `problem` (kernel parameters) and from shared memory on use, so that
  // no registers are held across the tile loop for it. Ends with a barrier.
  __device__ TilePipeline(const SimilarityProblem& problem, int64_t row0)
      : problem_(problem),
        stages_(static_cast<int>(ceil_div(problem.d * static_cast<int64_t>(sizeof(Input)), kStageRowBytes))) {
    if (threadIdx.x == 0) {
      q_block() = {static_cast<const unsigned char*>(problem.q) + row0 * stride_bytes(problem.q_row_stride),
                   problem.n - row0};
    }
    __syncthreads();
  }

  // Stages per tile; d = 0 runs as one stage of zeros.
  __device__ int stages() const { return stages_ > 0 ? stages_ : 1; }

  // Issues the loads of stage `stage` of the tile at column col0 into slot `slot`, as one commit group.
  __device__ void load(int64_t col0, int stage, int slot) const {
    issue(col0, stage, slot);
    cp_async_commit();
  }
  // An empty commit group: keeps one group per stream position for cp_async_wait.
  __device__ static void skip() { cp_async_commit(); }

  // Waits until the oldest stage in flight has landed for the whole CTA; after it, the slot read
  // by the previous accumulate() is free for the load kStages - 1 positions ahead.
  __device__ static void wait() {
    cp_async_wait<kStages - 2>();
    __syncthreads();
  }

  __device__ static void zero(TileAccumulator& acc) {
#pragma unroll
    for (int i = 0; i < kFragmentsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragmentsN; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.f;
      }
    }
  }

  // acc += the slot's stage: 4 steps of 32 bytes of depth (16 elements of fp16 / bf16, 8 of fp32).
  __device__ static void accumulate(TileAccumulator& acc, int slot) {
    const int lane = ThreadTile::lane();
    // ldmatrix rows of this lane: A's matrices are (rows +0 / +8) x (chunk lo / hi), B's
    // (chunk lo / hi) x (columns +0 / +8), so that each fragment's registers come out adjacent.
    // Every row this lane addresses is = lane (mod 8), so its chunk 2 step + c lies at
    // (c ^ lane % 8) ^ (2 step): step s is the address of step 0 with bits 5-6 xor-ed by s (rows
    // are 128-byte aligned).
    const int swizzle = lane % 8;
    const SharedAddress slot_base = pipeline_base() + slot * kStageBytes;
    const SharedAddress a_step0 =
        slot_base + (kWarpRows * ThreadTile::warp_row() + 8 * ((lane / 8) % 2) + swizzle) * kStageRowBytes +
        ((lane / 16) ^ swizzle) * 16;
    const SharedAddress b_step0 =
        slot_base + (kTileRows + kWarpCols * ThreadTile::warp_col() + 8 * (lane / 16) + swizzle) * kStageRowBytes +
        (((lane / 8) % 2) ^ swizzle) * 16;
#pragma unroll
    for (int step = 0; step < kChunksPerRow / 2; ++step) {
      const SharedAddress a_step = a_step0 ^ (step << 5);
      const SharedAddress b_step = b_step0 ^ (step << 5);
      uint32_t b[kFragmentsN][2];
#pragma unroll
      for (int pair = 0; pair < kFragmentsN / 2; ++pair) {
        uint32_t r[4];
        ldmatrix_x4(r, b_step + pair * 16 * kStageRowBytes);
        b[2 * pair][0] = r[0];
        b[2 * pair][1] = r[1];
        b[2 * pair + 1][0] = r[2];
        b[2 * pair + 1][1] = r[3];
      }
      uint32_t b_low[kFragmentsN][2];
      if constexpr (std::is_same<Input, float>::value) split_or_round(b, b_low);
#pragma unroll
      for (int i = 0; i < kFragmentsM; ++i) {
        uint32_t a[4];
        ldmatrix_x4(a, a_step + i * 16 * kStageRowBytes);
        uint32_t a_low[4];
        if constexpr (std::is_same<Input, float>::value) split_or_round(a, a_low);
#pragma unroll
        for (int j = 0; j < kFragmentsN; ++j) {
          if constexpr (Config::kSplit) {  // small terms first; low x low is below fp32 resolution
            mma<Input>(acc.v[i][j], a_low, b[j]);
            mma<Input>(acc.v[i][j], a, b_low[j]);
          }
          mma<Input>(acc.v[i][j], a, b[j]);
        }
      }
    }
  }

 private:
  // One stage (bytes [stage * kStageRowBytes, +kStageRowBytes) of every row) of the CTA's rows of
  // Q and the rows col0.. of K into a slot; rows and bytes outside the operands read as zero.
  __device__ void issue(int64_t col0, int stage, int slot) const {
    const int offset = slot * kStageBytes;
    const BlockRows q = q_block();
    issue_rows(q.first, problem_.q, problem_.q_row_stride, q.rows, offset, stage);
    const int64_t k_stride = stride_bytes(problem_.k_row_stride);
    issue_rows(static_cast<const unsigned char*>(problem_.k) + col0 * k_stride, problem_.k, problem_.k_row_stride,
               problem_.m - col0, offset + kTileRows * kStageRowBytes, stage);
  }

  static __device__ int64_t stride_bytes(int64_t row_stride) {
    return row_stride * static_cast<int64_t>(sizeof(Input));
  }

  // The CTA's block of rows of Q: its first row and how many rows the operand has from there on
  // (in shared memory: a per-CTA value the compiler would otherwise keep in registers).
  struct BlockRows {
    const unsigned char* first;
    int64_t rows;
  };
  __device__ static BlockRows& q_block() {
    __shared__ BlockRows block;
    return block;
  }

  // kTileRows stage rows at byte `offset` of the pipeline's shared memory from the rows that
  // start at `first` (rows_available of them) of the operand `data` (whose row stride is
  // row_stride elements); each thread copies one 16-byte chunk of every kRowsPerPass-th row (all
  // at the same swizzled chunk: row % 8 is the same for all of them).
  __device__ void issue_rows(const unsigned char* first, const void* data, int64_t row_stride, int64_t rows_available,
                             int offset, int stage) const {
    constexpr int kPasses = kTileRows / kRowsPerPass;
    static_assert(kRowsPerPass % 8 == 0, "one swizzle for all passes");
    const int thread = thread_index_uncached();
    const int chunk = thread % kChunksPerRow;
    const int row = thread / kChunksPerRow;
    const int64_t byte = int64_t{stage} * kStageRowBytes + chunk * 16;
    const int64_t remaining = problem_.d * static_cast<int64_t>(sizeof(Input)) - byte;
    const int chunk_bytes = static_cast<int>(remaining < 16 ? (remaining > 0 ? remaining : 0) : 16);
    // The block's rows start at a CTA-uniform address; a thread's rows lie a 32-bit offset past it
    // (is_valid bounds the row strides), which keeps the per-thread part of the address in one
    // register.
    const unsigned char* const base = static_cast<const unsigned char*>(data);
    const unsigned char* const block = first + int64_t{stage} * kStageRowBytes;
    const uint32_t stride32 = static_cast<uint32_t>(stride_bytes(row_stride));
    const uint32_t pass_stride = kRowsPerPass * stride32;
    uint32_t thread_offset = static_cast<uint32_t>(row) * stride32 + static_cast<uint32_t>(chunk) * 16;
    const int64_t rows_after = rows_available - row;
    const int rows_left = static_cast<int>(rows_after < kTileRows ? rows_after : kTileRows);
    const SharedAddress dst = pipeline_base() + offset + stage_offset(row, chunk);
    if (whole_chunks(data, row_stride)) {
      // Rows past the operand's end, and chunks past its row length, are zero-filled: cp.async
      // then reads nothing at the address, which may lie past the end.
      const bool chunk_inside = chunk_bytes > 0;
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        cp_async_16(dst + pass * kRowsPerPass * kStageRowBytes, block + thread_offset,
                    !(chunk_inside && pass * kRowsPerPass < rows_left));
        thread_offset += pass_stride;
      }
    } else {  // a slow path, kept out of the fast one's registers
#pragma unroll 1
      for (int pass = 0; pass < kPasses; ++pass) {
        const bool inside = pass * kRowsPerPass < rows_left && chunk_bytes > 0;
        copy_chunk_by_elements<Input>(dst + pass * kRowsPerPass * kStageRowBytes, inside ? block + thread_offset : base,
                                      inside ? chunk_bytes : 0);
        thread_offset += pass_stride;
      }
    }
  }

  // The stages of an operand load by cp.async when its rows and their length are whole, aligned
  // 16-byte chunks (d a multiple of 8 for fp16 / bf16, of 4 for fp32); otherwise (and for d = 0,
  // where there are no rows at all) element by element.
  __device__ bool whole_chunks(const void* data, int64_t row_stride) const {
    return problem_.d > 0 && (problem_.d * static_cast<int64_t>(sizeof(Input))) % 16 == 0 &&
           rows_are_16_byte_aligned<Input>(data, row_stride);
  }

  // fp32 fragments: high <- tf32(x), and low <- tf32(x - high) when splitting.
  template <int kCount>
  __device__ static void split_or_round(uint32_t (&high)[kCount], uint32_t (&low)[kCount]) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const uint32_t x = high[e];
      high[e] = round_to_tf32(x);
      if constexpr (Config::kSplit) low[e] = tf32_remainder(x, high[e]);
    }
  }
  template <int kCount>
  __device__ static void split_or_round(uint32_t (&high)[kCount][2], uint32_t (&low)[kCount][2]) {
#pragma unroll
    for (int j = 0; j < kCount; ++j) split_or_round(high[j], low[j]);
  }

  const SimilarityProblem& problem_;
  int stages_;
};

// Runs the tiles [column_tiles.begin, column_tiles.end) of the row block at row0 through the
// pipeline: epilogue.stage_columns(buffer, col0) before each tile's first stage (the stage's
// barrier makes the values visible), and epilogue.tile(acc, col0, buffer) with its raw dot
// products after its last; buffer is the tile's parity.
template <class Config, class Epilogue>
__device__ void sweep_column_tiles(const SimilarityProblem& problem, int64_t row0, TileRange column_tiles,
                                   Epilogue& epilogue) {
  using Pipeline = TilePipeline<Config>;
  const Pipeline pipeline(problem, row0);
  const int stages = pipeline.stages();
  TileAccumulator acc;
  Pipeline::zero(acc);
  // Stream positions: stage `stage` of tile `tile`. The loads run kStages - 1 positions ahead:
  // load_ahead(tile, stage, k, slot) loads the position k after (tile, stage), if there is one.
  auto load_ahead = [&](int tile, int stage, int k, int slot) {
    stage += k;
#pragma unroll
    for (int wrap = 0; wrap < kStages - 1; ++wrap) {
      if (stage >= stages) {
        stage -= stages;
        ++tile;
      }
    }
    if (tile < column_tiles.end) {
      pipeline.load(int64_t{tile} * kTileCols, stage, slot);
    } else {
      Pipeline::skip();
    }
  };
#pragma unroll 1
  for (int slot = 0; slot < kStages - 1; ++slot) load_ahead(column_tiles.begin, 0, slot, slot);

  int slot = 0;
  int stage = 0;
  for (int tile = column_tiles.begin; tile < column_tiles.end;) {
    const int buffer = (tile - column_tiles.begin) % 2;
    const int64_t col0 = int64_t{tile} * kTileCols;
    if (stage == 0) epilogue.stage_columns(buffer, col0);
    Pipeline::wait();
    load_ahead(tile, stage, kStages - 1, slot == 0 ? kStages - 1 : slot - 1);
    Pipeline::accumulate(acc, slot);
    slot = slot == kStages - 1 ? 0 : slot + 1;
    if (++stage == stages) {
      epilogue.tile(acc, col0, buffer);
      Pipeline::zero(acc);
      stage = 0;
      ++tile;
    }
  }
  cp_async_wait<0>();  // only empty groups are left
}

// Sum of one value per thread over the CTA in a fixed order (deterministic); valid in thread 0.
// Ends with a barrier, so it may be called again.
__device__ inline float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  __syncthreads();
  return total;
}

}  // namespace fused_losses
