// The one tile routine behind every kernel: a kTileRows x kTileCols tile of A B, accumulated in
// fp32 on the tensor cores (WMMA: fp16 / bf16 m16n16k16, fp32 as TF32 m16n16k8), with both
// operands staged global -> registers -> shared memory and the next stage's loads in flight
// during the current stage's MMAs. The result lands in shared memory, where the callers'
// epilogues read it with known coordinates.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "launch_plan.h"

namespace fused_losses {

namespace wmma = nvcuda::wmma;

// Compile-time choice of the product: Input is the element type read from global memory; fp32
// operands run as TF32, split into a high and a low TF32 part (three MMAs, about fp32 accuracy)
// when kSplitTf32.
template <class Input, bool kSplitTf32>
struct MmaConfig {
  static_assert(!kSplitTf32 || std::is_same<Input, float>::value, "TF32 splitting is for fp32");
  using InputType = Input;
  static constexpr bool kSplit = kSplitTf32;
};

// Tensor-core shape for a shared-memory element type.
template <class Element>
struct WmmaShape {
  static constexpr int kDepth = 16;
  using FragmentElement = Element;
};
template <>
struct WmmaShape<float> {
  static constexpr int kDepth = 8;
  using FragmentElement = wmma::precision::tf32;
};

template <class Layout>
constexpr bool kRowMajor = std::is_same<Layout, wmma::row_major>::value;

// A matrix in global memory, element (outer, inner) at data[outer * row_stride + inner]; reads
// outside outer_size x inner_size yield 0. When row_factors is set, row `outer` is multiplied by
// row_factors[outer] on its way to shared memory.
template <class T>
struct GlobalMatrix {
  const T* data;
  int64_t row_stride;
  int64_t outer_size;
  int64_t inner_size;
  const float* row_factors;
  bool vector_loads;  // 16-byte loads are aligned: see make_global_matrix
};

template <class T>
__host__ __device__ GlobalMatrix<T> make_global_matrix(const T* data, int64_t row_stride, int64_t outer_size,
                                                       int64_t inner_size, const float* row_factors = nullptr) {
  const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0 &&
                       (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  return {data, row_stride, outer_size, inner_size, row_factors, aligned};
}

// Copies a kOuter x kInner block of a GlobalMatrix<Src> into a shared-memory array of Dst, in
// two steps (load: global -> registers, store: registers -> shared) so that a caller can overlap
// the next block's loads with work on the current one. Each thread moves kLoads 16-byte vectors.
template <class Src, class Dst, int kOuter, int kInner>
struct BlockStager {
  static constexpr int kVector = 16 / static_cast<int>(sizeof(Src));
  static constexpr int kVectorsPerRow = kInner / kVector;
  static constexpr int kLoads = kOuter * kVectorsPerRow / kThreads;
  static_assert(kInner % kVector == 0 && (kOuter * kVectorsPerRow) % kThreads == 0, "block shape");
  static_assert(sizeof(Dst) >= sizeof(Src), "stores are whole 16-byte vectors");

  alignas(16) Dst values[kLoads][kVector];

  __device__ void load(const GlobalMatrix<Src>& matrix, int64_t outer0, int64_t inner0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int slot = threadIdx.x + l * kThreads;
      const int64_t outer = outer0 + slot / kVectorsPerRow;
      const int64_t inner = inner0 + (slot % kVectorsPerRow) * kVector;
      alignas(16) Src raw[kVector];
      if (outer < matrix.outer_size && matrix.vector_loads && inner + kVector <= matrix.inner_size) {
        *reinterpret_cast<uint4*>(raw) =
            *reinterpret_cast<const uint4*>(matrix.data + outer * matrix.row_stride + inner);
      } else {
#pragma unroll
        for (int t = 0; t < kVector; ++t) {
          const bool inside = outer < matrix.outer_size && inner + t < matrix.inner_size;
          raw[t] = inside ? matrix.data[outer * matrix.row_stride + inner + t] : static_cast<Src>(0.f);
        }
      }
      const float factor =
          matrix.row_factors != nullptr && outer < matrix.outer_size ? matrix.row_factors[outer] : 1.f;
#pragma unroll
      for (int t = 0; t < kVector; ++t) {
        values[l][t] = matrix.row_factors == nullptr
                           ? static_cast<Dst>(raw[t])
                           : static_cast<Dst>(static_cast<float>(raw[t]) * factor);
      }
    }
  }

  __device__ void store(Dst* shared, int shared_ld) const {
    constexpr int kChunks = kVector * static_cast<int>(sizeof(Dst)) / 16;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int slot = threadIdx.x + l * kThreads;
      uint4* target = reinterpret_cast<uint4*>(shared + (slot / kVectorsPerRow) * shared_ld +
                                               (slot % kVectorsPerRow) * kVector);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) target[c] = reinterpret_cast<const uint4*>(values[l])[c];
    }
  }
};

// Shared-memory elements of one operand tile, kExtent rows (A) or columns (B) by kTileDepth,
// stored as it lies in global memory: contiguous along the depth when depth_inner (A row-major,
// B column-major), else along the extent. Rows are padded by 16 bytes against bank conflicts;
// the padded row length keeps every fragment 32-byte aligned.
template <class Element>
constexpr int operand_tile_ld(int extent, bool depth_inner) {
  return (depth_inner ? kTileDepth : extent) + 16 / static_cast<int>(sizeof(Element));
}
template <class Element>
constexpr int operand_tile_elements(int extent, bool depth_inner) {
  return (depth_inner ? extent : kTileDepth) * operand_tile_ld<Element>(extent, depth_inner);
}

template <class Src, class Element, int kExtent, bool kDepthInner>
struct OperandTile {
  static constexpr int kLd = operand_tile_ld<Element>(kExtent, kDepthInner);
  using Stager = BlockStager<Src, Element, kDepthInner ? kExtent : kTileDepth, kDepthInner ? kTileDepth : kExtent>;

  // The block at depth depth0 of the tile starting at extent0.
  static __device__ void load(Stager& stager, const GlobalMatrix<Src>& matrix, int64_t extent0, int64_t depth0) {
    if constexpr (kDepthInner) {
      stager.load(matrix, extent0, depth0);
    } else {
      stager.load(matrix, depth0, extent0);
    }
  }
};

// Room for an operand tile in either layout.
template <class Element>
constexpr int operand_tile_capacity(int extent) {
  return operand_tile_elements<Element>(extent, true) > operand_tile_elements<Element>(extent, false)
             ? operand_tile_elements<Element>(extent, true)
             : operand_tile_elements<Element>(extent, false);
}

// Shared memory of one CTA: the staged operands and the fp32 result tile.
template <class Element>
struct TileShared {
  static constexpr int kResultLd = kTileCols + 4;
  alignas(128) Element a[operand_tile_capacity<Element>(kTileRows)];
  alignas(128) Element b[operand_tile_capacity<Element>(kTileCols)];
  alignas(128) float result[kTileRows][kResultLd];
};

template <class Fragment>
__device__ void round_to_tf32(Fragment& fragment) {
#pragma unroll
  for (int t = 0; t < fragment.num_elements; ++t) fragment.x[t] = wmma::__float_to_tf32(fragment.x[t]);
}

// high <- tf32(x), low <- tf32(x - high) for the fp32 values x loaded into `high`.
template <class Fragment>
__device__ void split_tf32(Fragment& high, Fragment& low) {
#pragma unroll
  for (int t = 0; t < high.num_elements; ++t) {
    const float x = high.x[t];
    high.x[t] = wmma::__float_to_tf32(x);
    low.x[t] = wmma::__float_to_tf32(x - high.x[t]);
  }
}

// Offset of logical element (row, col) in a shared tile with the given WMMA layout.
template <class Layout>
__device__ int tile_offset(int row, int col, int ld) {
  return kRowMajor<Layout> ? row * ld + col : col * ld + row;
}

// Warp tile: 32 x 32, as 2 x 2 fragments of 16 x 16; the 4 warps cover the 64 x 64 CTA tile.
constexpr int kWarpFragments = 2;

template <class Element>
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, WmmaShape<Element>::kDepth, float>;

// acc += A_block B_block over the kTileDepth staged in shared memory.
template <class Element, bool kSplit, class LayoutA, class LayoutB>
__device__ void warp_mma_stage(Accumulator<Element> (&acc)[kWarpFragments][kWarpFragments], const Element* a,
                               int lda, const Element* b, int ldb, int warp_row0, int warp_col0) {
  constexpr int kDepth = WmmaShape<Element>::kDepth;
  using FragmentElement = typename WmmaShape<Element>::FragmentElement;
  using FragmentA = wmma::fragment<wmma::matrix_a, 16, 16, kDepth, FragmentElement, LayoutA>;
  using FragmentB = wmma::fragment<wmma::matrix_b, 16, 16, kDepth, FragmentElement, LayoutB>;
  constexpr bool kTf32 = std::is_same<Element, float>::value;
#pragma unroll
  for (int k0 = 0; k0 < kTileDepth; k0 += kDepth) {
    FragmentA fa[kWarpFragments], fa_low[kWarpFragments];
    FragmentB fb[kWarpFragments], fb_low[kWarpFragments];
#pragma unroll
    for (int f = 0; f < kWarpFragments; ++f) {
      wmma::load_matrix_sync(fa[f], a + tile_offset<LayoutA>(warp_row0 + 16 * f, k0, lda), lda);
      wmma::load_matrix_sync(fb[f], b + tile_offset<LayoutB>(k0, warp_col0 + 16 * f, ldb), ldb);
      if constexpr (kSplit) {
        split_tf32(fa[f], fa_low[f]);
        split_tf32(fb[f], fb_low[f]);
      } else if constexpr (kTf32) {
        round_to_tf32(fa[f]);
        round_to_tf32(fb[f]);
      }
    }
#pragma unroll
    for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
      for (int j = 0; j < kWarpFragments; ++j) {
        if constexpr (kSplit) {  // small terms first; low x low is below fp32 resolution
          wmma::mma_sync(acc[i][j], fa_low[i], fb[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], fa[i], fb_low[j], acc[i][j]);
        }
        wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
}

// shared.result <- the (row0, col0) tile of A B, A: rows x depth, B: depth x cols, summed over
// depth in [0, depth_size). LayoutA / LayoutB say how each operand lies in global memory:
// A row-major is matrix_a(row, k) = a(row, k) (outer = row), column-major is a(k, row);
// B column-major is matrix_b(k, col) = b(col, k) (outer = col), row-major is b(k, col).
// The caller makes sure no thread still reads shared.result from a previous tile. Ends with a
// barrier: the result tile is visible to the whole CTA on return.
template <class Config, class LayoutA, class LayoutB, class SrcA, class SrcB, class Element>
__device__ void compute_tile(TileShared<Element>& shared, const GlobalMatrix<SrcA>& a, const GlobalMatrix<SrcB>& b,
                             int64_t row0, int64_t col0, int64_t depth_size) {
  using TileA = OperandTile<SrcA, Element, kTileRows, kRowMajor<LayoutA>>;
  using TileB = OperandTile<SrcB, Element, kTileCols, !kRowMajor<LayoutB>>;
  const int warp = threadIdx.x / 32;
  const int warp_row0 = (warp / 2) * 32;
  const int warp_col0 = (warp % 2) * 32;

  Accumulator<Element> acc[kWarpFragments][kWarpFragments];
#pragma unroll
  for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
    for (int j = 0; j < kWarpFragments; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  typename TileA::Stager stage_a;
  typename TileB::Stager stage_b;
  if (depth_size > 0) {
    TileA::load(stage_a, a, row0, 0);
    TileB::load(stage_b, b, col0, 0);
  }
  for (int64_t depth0 = 0; depth0 < depth_size; depth0 += kTileDepth) {
    __syncthreads();  // the previous stage's MMAs are done with shared.a / shared.b
    stage_a.store(shared.a, TileA::kLd);
    stage_b.store(shared.b, TileB::kLd);
    __syncthreads();
    if (depth0 + kTileDepth < depth_size) {
      TileA::load(stage_a, a, row0, depth0 + kTileDepth);
      TileB::load(stage_b, b, col0, depth0 + kTileDepth);
    }
    warp_mma_stage<Element, Config::kSplit, LayoutA, LayoutB>(acc, shared.a, TileA::kLd, shared.b, TileB::kLd,
                                                              warp_row0, warp_col0);
  }

#pragma unroll
  for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
    for (int j = 0; j < kWarpFragments; ++j) {
      wmma::store_matrix_sync(&shared.result[warp_row0 + 16 * i][warp_col0 + 16 * j], acc[i][j],
                              TileShared<Element>::kResultLd, wmma::mem_row_major);
    }
  }
  __syncthreads();
}

// Sum of one value per thread over the CTA in a fixed order (deterministic); valid in thread 0.
template <class T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

}  // namespace fused_losses
