// Pieces shared by the forward and backward launchers.
#pragma once

#include <cuda_runtime_api.h>

#include "similarity_kernels.h"
#include "similarity_math.h"
#include "tile_mma.cuh"

namespace fused_losses {

#define FL_RETURN_IF_ERROR(expression)          \
  do {                                          \
    const cudaError_t fl_status = (expression); \
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

// With d = 0 the inputs hold no elements, and their pointers may be null.
inline bool is_valid(const SimilarityProblem& problem) {
  return problem.n > 0 && problem.m > 0 && problem.d >= 0 &&
         (problem.d == 0 || (problem.q != nullptr && problem.k != nullptr)) && problem.inv_norm_q != nullptr &&
         problem.inv_norm_k != nullptr && problem.scale != nullptr;
}

template <class T>
__host__ __device__ GlobalMatrix<T> q_matrix(const SimilarityProblem& problem) {
  return make_global_matrix(static_cast<const T*>(problem.q), problem.q_row_stride, problem.n, problem.d);
}

template <class T>
__host__ __device__ GlobalMatrix<T> k_matrix(const SimilarityProblem& problem) {
  return make_global_matrix(static_cast<const T*>(problem.k), problem.k_row_stride, problem.m, problem.d);
}

// S_ij from the raw dot product of q_i and k_j, with row_factor = scale * inv_norm_q[i] and
// col_factor = inv_norm_k[j]. The forward's row pass and the backward both compute S through
// here, from the same tile routine on the same tiles, so the backward's recomputation matches the
// S behind lse_row bit for bit.
__device__ __forceinline__ float similarity_entry(float row_factor, float col_factor, float dot, bool masked) {
  return masked ? kNegInf : row_factor * col_factor * dot;
}

__device__ __forceinline__ float shuffle_xor(float value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

__device__ __forceinline__ LseState shuffle_xor(LseState state, int lane_mask) {
  return {shuffle_xor(state.max, lane_mask), shuffle_xor(state.sum, lane_mask)};
}

}  // namespace fused_losses
