// Emulated fp16: 16-bit storage, conversions rounding to nearest even (via _Float16).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_emulation.h"

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float value) {
    const _Float16 h = static_cast<_Float16>(value);
    std::memcpy(&bits, &h, sizeof(bits));
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, sizeof(bits));
    return static_cast<float>(h);
  }
};
