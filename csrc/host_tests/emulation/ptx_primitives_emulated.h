// The functions of csrc/ptx_primitives.cuh with the PTX ISA's per-thread semantics, on the fiber
// emulation of cuda_emulation.h: what a lane passes in and gets back is what the hardware's lane
// would, so the kernels' fragment layouts, swizzled addresses and pipeline order are exercised.
// Arithmetic: the MMAs sum the exact products in double, rounded to fp32 once per instruction (the
// hardware's order of summation is unspecified); the TF32 MMA ignores the low 13 bits of its
// operands, as the hardware does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_emulation.h"
#include "cuda_fp16.h"

namespace fused_losses {

using SharedAddress = uintptr_t;

inline SharedAddress shared_address(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer); }

inline int thread_index_uncached() { return static_cast<int>(threadIdx.x); }

inline unsigned char* dynamic_shared_memory() { return emulation::block().dynamic_shared(); }

// The copy lands when a cp_async_wait retires its group: the latest a GPU may land it.
inline void cp_async_16(SharedAddress dst, const void* src, bool zero_fill) {
  emulation::block().cp_async(reinterpret_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src),
                              zero_fill ? 0 : 16);
}

inline void cp_async_commit() { emulation::block().cp_async_commit(); }

template <int kPending>
void cp_async_wait() {
  emulation::block().cp_async_wait(kPending);
}

inline void store_shared_16(SharedAddress dst, const uint32_t (&words)[4]) {
  std::memcpy(reinterpret_cast<void*>(dst), words, sizeof(words));
}

inline void ldmatrix_x4(uint32_t (&r)[4], SharedAddress row_address) {
  emulation::Block& cta = emulation::block();
  emulation::Block::Slots& slots = cta.exchange();
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&slots.words[lane][0], &row_address, sizeof(row_address));
  cta.sync_warp();
  for (unsigned matrix = 0; matrix < 4; ++matrix) {
    SharedAddress row;
    std::memcpy(&row, &slots.words[8 * matrix + lane / 4][0], sizeof(row));
    std::memcpy(&r[matrix], reinterpret_cast<const void*>(row + 4 * (lane % 4)), sizeof(uint32_t));
  }
  cta.flip();
}

namespace emulated {

// Operand element `half` (0 / 1) of a 32-bit fragment register, as a float.
template <class Element>
float element(uint32_t word, unsigned half) {
  if constexpr (std::is_same<Element, float>::value) {
    const uint32_t tf32 = word & 0xffffe000u;
    float value;
    std::memcpy(&value, &tf32, sizeof(value));
    return value;
  } else {
    Element value;
    const uint16_t bits = static_cast<uint16_t>(word >> (16 * half));
    std::memcpy(&value, &bits, sizeof(bits));
    return static_cast<float>(value);
  }
}

}  // namespace emulated

template <class Element>
void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr bool kTf32 = std::is_same<Element, float>::value;
  constexpr unsigned kDepth = kTf32 ? 8 : 16;
  constexpr unsigned kPerRegister = kTf32 ? 1 : 2;  // k values per 32-bit register
  emulation::Block& cta = emulation::block();
  emulation::Block::Slots& slots = cta.exchange();
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&slots.words[lane][0], a, sizeof(a));
  std::memcpy(&slots.words[lane][4], b, sizeof(b));
  cta.sync_warp();
  // A(row, k): register (row >= 8) + 2 (k >= depth / 2) of lane 4 (row % 8) + (k % (depth / 2)) / per;
  // B(k, col): register (k >= depth / 2) of lane 4 col + (k % (depth / 2)) / per.
  auto a_at = [&](unsigned row, unsigned k) {
    const unsigned half_depth = kDepth / 2;
    const unsigned owner = 4 * (row % 8) + (k % half_depth) / kPerRegister;
    const unsigned reg = (row >= 8 ? 1 : 0) + (k >= half_depth ? 2 : 0);
    return emulated::element<Element>(slots.words[owner][reg], k % kPerRegister);
  };
  auto b_at = [&](unsigned k, unsigned col) {
    const unsigned half_depth = kDepth / 2;
    const unsigned owner = 4 * col + (k % half_depth) / kPerRegister;
    return emulated::element<Element>(slots.words[owner][4 + (k >= half_depth ? 1 : 0)], k % kPerRegister);
  };
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = lane / 4 + 8 * (e / 2), col = 2 * (lane % 4) + e % 2;
    double sum = d[e];
    for (unsigned k = 0; k < kDepth; ++k) sum += static_cast<double>(a_at(row, k)) * b_at(k, col);
    d[e] = static_cast<float>(sum);
  }
  cta.flip();
}

// Round to nearest, ties away from zero, keeping 10 mantissa bits (cvt.rna.tf32.f32).
inline uint32_t round_to_tf32(uint32_t word) {
  if ((word & 0x7f800000u) != 0x7f800000u) word = (word + 0x1000u) & 0xffffe000u;
  return word;
}

inline uint32_t tf32_remainder(uint32_t word, uint32_t high) {
  float x, h;
  std::memcpy(&x, &word, sizeof(x));
  std::memcpy(&h, &high, sizeof(h));
  const float low = x - h;
  uint32_t bits;
  std::memcpy(&bits, &low, sizeof(bits));
  return round_to_tf32(bits);
}

template <class Element>
uint32_t pack_pair(float lo, float hi) {
  const Element low(lo), high(hi);
  uint16_t low_bits, high_bits;
  std::memcpy(&low_bits, &low, sizeof(low_bits));
  std::memcpy(&high_bits, &high, sizeof(high_bits));
  return static_cast<uint32_t>(low_bits) | (static_cast<uint32_t>(high_bits) << 16);
}

}  // namespace fused_losses
