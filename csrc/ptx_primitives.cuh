// Every inline-PTX instruction the fused kernels use, each behind a small function. The CPU
// emulation of the kernels (csrc/host_tests, FUSED_LOSSES_HOST_EMULATION) swaps this file for
// host_tests/emulation/ptx_primitives_emulated.h, which gives the same functions the documented
// per-thread semantics, so that the kernels' own fragment layouts and addressing run on the CPU.
// (The scalar ex2 / lg2 / rcp live in similarity_math.h, shared with the plain host tests.)
#pragma once

#if defined(FUSED_LOSSES_HOST_EMULATION)
#include "ptx_primitives_emulated.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fused_losses {

// An address in the CTA's shared memory window, as ldmatrix and cp.async take it.
using SharedAddress = uint32_t;

__device__ __forceinline__ SharedAddress shared_address(const void* pointer) {
  return static_cast<SharedAddress>(__cvta_generic_to_shared(pointer));
}

// threadIdx.x, read anew at every call: the compiler cannot hoist what is computed from it out of
// a loop, so such values are recomputed where they are used instead of holding registers across
// the loop (the pipeline's load addresses: what keeps the kernels at 128 registers).
__device__ __forceinline__ int thread_index_uncached() {
  unsigned index;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(index));
  return static_cast<int>(index);
}

// The CTA's dynamic shared memory (sized at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char fl_dynamic_shared[];
  return fl_dynamic_shared;
}

// Copies 16 bytes global -> shared asynchronously; with zero_fill, writes 16 zero bytes instead
// and reads nothing at src. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(SharedAddress dst, const void* src, bool zero_fill) {
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %2, 0;\n"
      "  cp.async.cg.shared.global [%0], [%1], 16, p;\n"
      "}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(zero_fill))
      : "memory");
}

// 16 bytes (four words) to shared memory, synchronously.
__device__ __forceinline__ void store_shared_16(SharedAddress dst, const uint32_t (&words)[4]) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(words[0]), "r"(words[1]), "r"(words[2]),
               "r"(words[3])
               : "memory");
}

// Closes the group of cp.async issued by this thread since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8 x 8 matrices of 16-bit elements (8 rows of 16 bytes each) from shared memory: lanes
// 8i .. 8i+7 give the row addresses of matrix i; lane l receives in r[i] the elements
// 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], SharedAddress row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

// d += a b for one m16n8k16 (16-bit inputs) or m16n8k8 (TF32 inputs) tensor-core product, with
// the PTX ISA's fragment layouts (g = lane / 4, t = lane % 4):
//   d[0], d[1]: (row g, cols 2t, 2t+1); d[2], d[3]: (row g+8, cols 2t, 2t+1);
//   16-bit a: a[0] (g, k 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..);
//          b: b[0] (k 2t..2t+1, col g), b[1] (k 2t+8.., col g);
//   TF32   a: a[0] (g, t), a[1] (g+8, t), a[2] (g, t+4), a[3] (g+8, t+4); b: b[0] (t, g), b[1] (t+4, g).
template <class Element>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma<float>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The fp32 value in the bits of `word`, rounded to TF32 (nearest, ties away from zero).
__device__ __forceinline__ uint32_t round_to_tf32(uint32_t word) {
  uint32_t rounded;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(rounded) : "f"(__uint_as_float(word)));
  return rounded;
}

// x - tf32(x) for the fp32 value in `word`, rounded to TF32: the low part of a split operand.
__device__ __forceinline__ uint32_t tf32_remainder(uint32_t word, uint32_t high) {
  return round_to_tf32(__float_as_uint(__uint_as_float(word) - __uint_as_float(high)));
}

// Two floats as one 32-bit word of two 16-bit elements (lo in the low half), rounded to nearest.
template <class Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  uint32_t word;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(word) : "f"(hi), "f"(lo));
  return word;
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  uint32_t word;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(word) : "f"(hi), "f"(lo));
  return word;
}

}  // namespace fused_losses

#endif  // FUSED_LOSSES_HOST_EMULATION
