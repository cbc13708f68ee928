// The fiber scheduler of cuda_emulation.h. Fibers switch with a few instructions of x86-64
// assembly (swapcontext makes a system call per switch: 50 times slower here).
#include "cuda_emulation.h"

#include <cstdio>
#include <cstdlib>

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers are written for x86-64"
#endif

// switch_stack(save, load): saves the callee-saved registers on the current stack, stores the
// stack pointer in *save, and resumes the stack `load` (saved the same way).
extern "C" void fl_emulation_switch_stack(void** save, void* load);
asm(R"(
  .text
  .globl fl_emulation_switch_stack
  .type fl_emulation_switch_stack, @function
fl_emulation_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_emulation_switch_stack, .-fl_emulation_switch_stack
)");

namespace emulation {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;
Block* current_block = nullptr;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s (block %u %u %u, thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x);
  std::abort();
}

}  // namespace

struct Block::Fiber {
  std::unique_ptr<unsigned char[]> stack;
  void* sp = nullptr;
  bool done = false;
};

Block& block() { return *current_block; }

Block::Block(unsigned threads, size_t dynamic_shared_bytes)
    : threads_(threads), live_(threads), fibers_(threads), warp_barriers_((threads + 31) / 32),
      exchange_((threads + 31) / 32), parity_(threads, 0), open_groups_(threads), committed_(threads),
      dynamic_storage_(new unsigned char[dynamic_shared_bytes + 256]) {
  // Shared memory starts 256-byte aligned, like the device's.
  const uintptr_t address = reinterpret_cast<uintptr_t>(dynamic_storage_.get());
  dynamic_shared_ = dynamic_storage_.get() + (256 - address % 256) % 256;
}

Block::~Block() = default;

void Block::entry() {
  Block& self = *current_block;
  self.body_(self.body_context_);
  self.finish_current();
}

void Block::run_fibers() {
  if (current_block != nullptr) fail("nested block");
  current_block = this;
  for (unsigned t = 0; t < threads_; ++t) {
    Fiber& fiber = fibers_[t];
    fiber.stack.reset(new unsigned char[kStackBytes]);
    // A stack that "returns" into entry(): its address, then six callee-saved registers.
    uintptr_t top = (reinterpret_cast<uintptr_t>(fiber.stack.get()) + kStackBytes) & ~uintptr_t{15};
    auto* words = reinterpret_cast<void**>(top);
    words[-1] = nullptr;  // entry()'s own return address: entry never returns
    words[-2] = reinterpret_cast<void*>(&Block::entry);
    for (int r = 3; r <= 8; ++r) words[-r] = nullptr;
    fiber.sp = &words[-8];
    ready_.push_back(t);
  }
  current_ = ready_.front();
  ready_.pop_front();
  threadIdx = dim3(current_);
  fl_emulation_switch_stack(&scheduler_sp_, fibers_[current_].sp);
  current_block = nullptr;
  for (unsigned t = 0; t < threads_; ++t) {
    if (!open_groups_[t].empty()) fail("cp.async without commit at exit");
  }
}

// Runs the next ready fiber; back to run_fibers() when every fiber is done.
void Block::switch_to_next() {
  Fiber& from = fibers_[current_];
  if (ready_.empty()) {
    if (live_ > 0) fail("deadlock: a barrier that not every live thread reaches");
    fl_emulation_switch_stack(&from.sp, scheduler_sp_);
    return;
  }
  current_ = ready_.front();
  ready_.pop_front();
  const unsigned next = current_;
  threadIdx = dim3(next);
  fl_emulation_switch_stack(&from.sp, fibers_[next].sp);
  threadIdx = dim3(current_);  // resumed
}

void Block::finish_current() {
  fibers_[current_].done = true;
  --live_;
  // Exited threads no longer hold up barriers.
  if (block_barrier_.arrived > 0 && block_barrier_.arrived == live_) release(block_barrier_);
  const unsigned warp = current_ / 32;
  if (warp_barriers_[warp].arrived > 0 && warp_barriers_[warp].arrived == warp_live(warp)) {
    release(warp_barriers_[warp]);
  }
  switch_to_next();
  fail("a finished fiber resumed");
}

unsigned Block::warp_live(unsigned warp) const {
  unsigned live = 0;
  for (unsigned t = warp * 32; t < threads_ && t < warp * 32 + 32; ++t) live += fibers_[t].done ? 0 : 1;
  return live;
}

void Block::release(Barrier& barrier) {
  for (unsigned t : barrier.waiting) ready_.push_back(t);
  barrier.waiting.clear();
  barrier.arrived = 0;
}

void Block::wait(Barrier& barrier, unsigned expected) {
  if (++barrier.arrived == expected) {
    release(barrier);
    return;
  }
  barrier.waiting.push_back(current_);
  switch_to_next();
}

void Block::cp_async_wait(size_t pending) {
  auto& groups = committed_[threadIdx.x];
  while (groups.size() > pending) {
    for (const PendingCopy& copy : groups.front()) {
      std::memcpy(copy.dst, copy.src, static_cast<size_t>(copy.src_bytes));
      std::memset(copy.dst + copy.src_bytes, 0, static_cast<size_t>(16 - copy.src_bytes));
    }
    groups.pop_front();
  }
}

}  // namespace emulation
