// A CPU stand-in for the small part of CUDA the kernels use, so that csrc/*.cu can be compiled
// by the host compiler and run in tests/test_cuda_host.py: each CTA runs as blockDim.x threads
// (one CTA at a time, so `__shared__` can be a function-static variable), __syncthreads is a
// barrier, warp shuffles go through per-warp slots, and the WMMA fragments (mma.h) hold whole
// tiles, multiplied in fp32. Kernel launches `k<<<grid, block, smem, stream>>>(args)` are
// rewritten by the test into `::emulation::Launcher(grid, block, smem, stream).run(k, args)`.
#pragma once

#include <array>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace emulation {

struct Block {
  explicit Block(unsigned threads) : all(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    slots.resize(warps.size());
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<double, 32>> slots;
};
inline Block* current_block = nullptr;

struct Launcher {
  dim3 grid, block;
  Launcher(dim3 grid_, dim3 block_, size_t = 0, cudaStream_t = nullptr) : grid(grid_), block(block_) {}

  template <class... Params, class... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          Block state(block.x);
          current_block = &state;
          std::vector<std::thread> threads;
          for (unsigned t = 0; t < block.x; ++t) {
            threads.emplace_back([&params, kernel, t] {
              threadIdx = dim3(t);
              std::apply(kernel, params);
            });
          }
          for (std::thread& thread : threads) thread.join();
          current_block = nullptr;
        }
      }
    }
  }
};

}  // namespace emulation

inline void __syncthreads() { emulation::current_block->all.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emulation::Block& block = *emulation::current_block;
  block.slots[warp][lane] = static_cast<double>(value);
  block.warps[warp]->arrive_and_wait();
  const T result = static_cast<T>(block.slots[warp][lane ^ static_cast<unsigned>(lane_mask)]);
  block.warps[warp]->arrive_and_wait();
  return result;
}
