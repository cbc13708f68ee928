// Pieces shared by the forward and weights launchers.
#pragma once

#include <cuda_runtime_api.h>

#include "similarity_kernels.h"
#include "similarity_math.h"
#include "tile_mma.cuh"

namespace fused_losses {

#define FL_RETURN_IF_ERROR(expression)              \
  do {                                              \
    const cudaError_t fl_status = (expression);     \
    if (fl_status != cudaSuccess) return fl_status; \
  } while (0)

// Calls launch(MmaConfig<Input, split>{}) for the problem's input type.
template <class Launch>
cudaError_t dispatch_input_type(DType dtype, bool fp32_single_pass_tf32, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat16:
      return launch(MmaConfig<__half, false>{});
    case DType::kBFloat16:
      return launch(MmaConfig<__nv_bfloat16, false>{});
    case DType::kFloat32:
      return fp32_single_pass_tf32 ? launch(MmaConfig<float, false>{}) : launch(MmaConfig<float, true>{});
  }
  return cudaErrorInvalidValue;
}

inline bool has_labels(const SimilarityProblem& problem) { return problem.row_labels != nullptr; }

// With d = 0 the inputs hold no elements, and their pointers may be null.
inline bool is_valid(const SimilarityProblem& problem) {
  const int64_t element = problem.dtype == DType::kFloat32 ? 4 : 2;
  const auto stride_ok = [&](int64_t stride) { return stride >= problem.d && stride * element <= kMaxRowStrideBytes; };
  return problem.n > 0 && problem.m > 0 && problem.d >= 0 && stride_ok(problem.q_row_stride) &&
         stride_ok(problem.k_row_stride) && (problem.d == 0 || (problem.q != nullptr && problem.k != nullptr)) &&
         problem.inv_norm_q != nullptr && problem.inv_norm_k != nullptr && problem.scale != nullptr &&
         (problem.row_labels == nullptr) == (problem.col_labels == nullptr);
}

// Opts a pipeline kernel in to its dynamic shared memory and returns, in *ctas_per_sm, how many of
// its CTAs fit on one SM of the current device (registers, shared memory and threads).
template <class Kernel>
cudaError_t prepare_pipeline_kernel(Kernel* kernel, int* ctas_per_sm) {
  const void* function = reinterpret_cast<const void*>(kernel);
  FL_RETURN_IF_ERROR(
      cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize, kDynamicSharedBytes));
  FL_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas_per_sm, function, kThreads,
                                                                   kDynamicSharedBytes));
  return *ctas_per_sm > 0 ? cudaSuccess : cudaErrorInvalidConfiguration;
}

// How the column tiles of m columns are dealt to `splits` CTAs (the grid's x dimension).
inline ColumnSplit column_tiles_split(int64_t m, int64_t splits) {
  return column_split(ceil_div(m, kTileCols), splits);
}

__device__ __forceinline__ float shuffle_xor(float value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

__device__ __forceinline__ LseState shuffle_xor(LseState state, int lane_mask) {
  return {shuffle_xor(state.max, lane_mask), shuffle_xor(state.sum, lane_mask)};
}

}  // namespace fused_losses
