// A CPU stand-in for the small part of CUDA the kernels use, so that csrc/*.cu can be compiled by
// the host compiler and run in tests/test_cuda_host.py. Kernel launches
// `k<<<grid, block, smem, stream>>>(args)` are rewritten by the test into
// `::emulation::Launcher(grid, block, smem, stream).run(k, args)`.
//
// Each CTA runs on the calling OS thread with every CUDA thread as a fiber (its own stack): a
// fiber runs until it waits at a barrier (__syncthreads, or a warp collective: shuffles,
// ldmatrix, mma), then the next ready fiber runs. CTAs run one at a time, so `__shared__`
// variables can be function-static. A barrier that not every live thread reaches is reported as
// a deadlock. Warp collectives exchange values through per-warp slots (double-buffered, so one
// barrier per collective suffices). The order in which ready fibers run is fixed: the emulation
// is deterministic, and finds ordering bugs (a missing barrier or cp.async wait), not races.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <tuple>
#include <utility>
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

struct alignas(8) float2 {
  float x, y;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// The running fiber's indices (set by the scheduler at every switch).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emulation {

// What cudaOccupancyMaxActiveBlocksPerMultiprocessor answers (tests vary it).
inline int ctas_per_sm = 2;

// Test hook: when set, called for every entry of S a kernel computes (global row and column, S in
// log2 units), through csrc/tile_mma.cuh's FL_OBSERVE_SIMILARITY.
inline void (*observe_similarity)(int64_t row, int64_t col, float s2) = nullptr;

class Block;
Block& block();

// A group of fibers that wait for one another: all `count` members, or fewer once some finished.
struct Barrier {
  unsigned arrived = 0;
  std::vector<unsigned> waiting;
};

class Block {
 public:
  Block(unsigned threads, size_t dynamic_shared_bytes);
  ~Block();
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  // Runs body() in every thread's fiber until all have returned.
  template <class Body>
  void run(Body&& body) {
    body_ = [](void* context) { (*static_cast<Body*>(context))(); };
    body_context_ = &body;
    run_fibers();
  }

  unsigned char* dynamic_shared() { return dynamic_shared_; }
  void sync_threads() { wait(block_barrier_, live_); }
  void sync_warp() { wait(warp_barriers_[threadIdx.x / 32], warp_live(threadIdx.x / 32)); }

  // The calling lane's slot of the current exchange buffer of its warp, and the warp's slots of
  // that buffer; flip() moves the lane to the other buffer after an exchange.
  struct Slots {
    uint32_t words[32][8];
  };
  Slots& exchange() { return exchange_[threadIdx.x / 32].buffers[parity_[threadIdx.x]]; }
  void flip() { parity_[threadIdx.x] ^= 1; }

  // cp.async: copies wait in commit groups of their thread until a cp_async_wait retires them.
  struct PendingCopy {
    unsigned char* dst;
    const unsigned char* src;
    int src_bytes;
  };
  void cp_async(unsigned char* dst, const unsigned char* src, int src_bytes) {
    open_groups_[threadIdx.x].push_back({dst, src, src_bytes});
  }
  void cp_async_commit() {
    committed_[threadIdx.x].push_back(std::move(open_groups_[threadIdx.x]));
    open_groups_[threadIdx.x].clear();
  }
  void cp_async_wait(size_t pending);

 private:
  struct Fiber;
  void run_fibers();
  void wait(Barrier& barrier, unsigned expected);
  void release(Barrier& barrier);
  void switch_to_next();
  void finish_current();
  unsigned warp_live(unsigned warp) const;
  static void entry();

  unsigned threads_;
  unsigned live_;
  std::vector<Fiber> fibers_;
  std::deque<unsigned> ready_;
  unsigned current_ = 0;
  void* scheduler_sp_ = nullptr;
  Barrier block_barrier_;
  std::vector<Barrier> warp_barriers_;
  struct WarpExchange {
    Slots buffers[2];
  };
  std::vector<WarpExchange> exchange_;
  std::vector<unsigned char> parity_;
  std::vector<std::vector<PendingCopy>> open_groups_;
  std::vector<std::deque<std::vector<PendingCopy>>> committed_;
  std::unique_ptr<unsigned char[]> dynamic_storage_;
  unsigned char* dynamic_shared_;
  void (*body_)(void*) = nullptr;
  void* body_context_ = nullptr;
};

struct Launcher {
  dim3 grid, block;
  size_t dynamic_shared_bytes;
  Launcher(dim3 grid_, dim3 block_, size_t smem = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), dynamic_shared_bytes(smem) {}

  template <class... Params, class... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          Block cta(block.x, dynamic_shared_bytes);
          cta.run([&] { std::apply(kernel, params); });
        }
      }
    }
  }
};

}  // namespace emulation

#define FL_OBSERVE_SIMILARITY(row, col, s2) \
  (::emulation::observe_similarity != nullptr ? ::emulation::observe_similarity(row, col, s2) : void())

inline void __syncthreads() { emulation::block().sync_threads(); }

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(emulation::Block::Slots::words[0]), "fits a lane's slot");
  emulation::Block& cta = emulation::block();
  emulation::Block::Slots& slots = cta.exchange();
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&slots.words[lane][0], &value, sizeof(T));
  cta.sync_warp();
  T result;
  std::memcpy(&result, &slots.words[lane ^ static_cast<unsigned>(lane_mask)][0], sizeof(T));
  cta.flip();
  return result;
}

inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* ctas, const void*, int, size_t) {
  *ctas = emulation::ctas_per_sm;
  return cudaSuccess;
}
