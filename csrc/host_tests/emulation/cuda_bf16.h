// Emulated bf16: the top 16 bits of an fp32, rounded to nearest even.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_emulation.h"

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float value) {
    uint32_t word;
    std::memcpy(&word, &value, sizeof(word));
    if (std::isnan(value)) {
      bits = 0x7fc0;
    } else {
      bits = static_cast<uint16_t>((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &word, sizeof(value));
    return value;
  }
};
