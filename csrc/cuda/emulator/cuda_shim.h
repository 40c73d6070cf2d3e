// CPU emulation of the CUDA execution model, enough to run fastgpt's kernels unchanged on
// a machine without a GPU (tests/test_cuda.py builds emulator.cpp with it). Not part of
// the extension: setup.py compiles csrc/cuda/*.cu only.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; the blocks of a
// grid run one after the other. A fiber runs until it reaches a barrier (__syncthreads,
// or a warp collective: shuffles, ldmatrix, mma), where it yields to the scheduler; the
// scheduler resumes fibers round-robin (forward or reverse order) until each barrier has
// all its participants. Memory is shared and sequentially consistent, so what the
// emulation checks is the kernels' index math, synchronisation structure and pipeline
// order -- not timing-dependent races beyond what the two schedule orders and the two
// cp.async modes (copy at issue / copy at the wait) expose. A barrier that can never
// complete (a thread exited or skipped it) is reported as a deadlock.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static  // one block runs at a time: a function-local static is its shared memory
#define __launch_bounds__(...)
#define FASTGPT_EMULATION 1

namespace fastgpt_emu {

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread_idx;
  bool finished = false;
  std::vector<Copy> open_group;                // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;       // committed, oldest first
};

struct Barrier {
  int size = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Range {
  const void* begin;
  size_t bytes;
};

// Exchange area of a warp collective: every lane publishes its operands here, waits for
// the warp, reads what it needs from the other lanes, and waits again before reuse.
struct LaneSlots {
  uint64_t word[12];
};

struct Runtime {
  uint3 grid_dim, block_dim, block_idx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<LaneSlots> lane_slots;  // 32 per warp
  std::vector<unsigned char> dynamic_smem;
  std::vector<Range> global_ranges;   // where cp.async may read
  std::function<void()> kernel;
  uint64_t progress = 0;
  bool reverse_order = false;         // scheduling order of the fibers
  bool copy_at_wait = false;          // cp.async data lands at the wait (true) or at issue (false)
  // The emulated device's shared-memory opt-in: the most a block may opt in to (an sm_90 block's by
  // default; tests lower it), and what each kernel (by address) opted in to so far.
  size_t max_shared_memory_per_block = 227 * 1024;
  std::map<const void*, size_t> shared_memory_opt_in;
  std::string error;
};

inline Runtime& runtime() {
  static Runtime instance;
  return instance;
}

inline int thread_rank() { return int(runtime().current->thread_idx.x); }

inline void fail(const std::string& message) {
  Runtime& rt = runtime();
  if (rt.error.empty()) rt.error = message;
}

inline void yield() { swapcontext(&runtime().current->context, &runtime().scheduler); }

inline void arrive(Barrier& barrier) {
  Runtime& rt = runtime();
  ++rt.progress;
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.size) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline void warp_sync() { arrive(runtime().warp_barriers[thread_rank() / 32]); }
inline LaneSlots& lane_slots(int lane) { return runtime().lane_slots[(thread_rank() / 32) * 32 + lane]; }

inline void fiber_entry() {
  Runtime& rt = runtime();
  rt.kernel();
  rt.current->finished = true;
  ++rt.progress;
  swapcontext(&rt.current->context, &rt.scheduler);
}

// Runs `kernel` (a call of the __global__ function with its arguments) over the grid.
inline void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, std::function<void()> kernel) {
  Runtime& rt = runtime();
  const int threads = int(block.x * block.y * block.z);
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
    throw std::runtime_error("emulator: 1-D blocks of whole warps only");
  }
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {  // a GPU refuses such a launch too
    throw std::runtime_error("emulator: invalid configuration argument (a grid past CUDA's limits)");
  }
  rt.kernel = std::move(kernel);
  rt.grid_dim = {grid.x, grid.y, grid.z};
  rt.block_dim = {block.x, 1, 1};
  rt.error.clear();
  constexpr size_t kStackBytes = 256 * 1024;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        rt.block_idx = {bx, by, bz};
        // Uninitialised shared memory reads as NaN, so a read before its cp.async landed shows.
        rt.dynamic_smem.assign(dynamic_smem_bytes + 16, 0xff);
        rt.block_barrier = {threads, 0, 0};
        rt.warp_barriers.assign(threads / 32, Barrier{32, 0, 0});
        rt.lane_slots.assign(threads, LaneSlots{});
        rt.fibers.clear();
        rt.fibers.resize(threads);
        for (int t = 0; t < threads; ++t) {
          Fiber& fiber = rt.fibers[t];
          fiber.thread_idx = {unsigned(t), 0, 0};
          fiber.stack.reset(new char[kStackBytes]);
          getcontext(&fiber.context);
          fiber.context.uc_stack.ss_sp = fiber.stack.get();
          fiber.context.uc_stack.ss_size = kStackBytes;
          fiber.context.uc_link = nullptr;
          makecontext(&fiber.context, fiber_entry, 0);
        }
        int remaining = threads;
        while (remaining > 0) {
          const uint64_t before = rt.progress;
          for (int i = 0; i < threads; ++i) {
            Fiber& fiber = rt.fibers[rt.reverse_order ? threads - 1 - i : i];
            if (fiber.finished) continue;
            rt.current = &fiber;
            swapcontext(&rt.scheduler, &fiber.context);
            if (fiber.finished) --remaining;
          }
          if (remaining > 0 && rt.progress == before) {
            throw std::runtime_error("emulator: deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                     "): a barrier can never complete (a thread exited or skipped it)");
          }
          if (!rt.error.empty()) throw std::runtime_error("emulator: " + rt.error);
        }
        if (!rt.error.empty()) throw std::runtime_error("emulator: " + rt.error);
      }
    }
  }
}

template <typename Bits, typename T>
inline Bits bit_cast(const T& value) {
  static_assert(sizeof(Bits) == sizeof(T));
  Bits bits;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

}  // namespace fastgpt_emu

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::fastgpt_emu::runtime().current->thread_idx)
#define blockIdx (::fastgpt_emu::runtime().block_idx)
#define blockDim (::fastgpt_emu::runtime().block_dim)
#define gridDim (::fastgpt_emu::runtime().grid_dim)

inline void __syncthreads() { ::fastgpt_emu::arrive(::fastgpt_emu::runtime().block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::fastgpt_emu::warp_sync(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  using namespace fastgpt_emu;
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  const int lane = thread_rank() % 32;
  lane_slots(lane).word[0] = bit_cast<uint32_t>(value);
  warp_sync();
  const float result = bit_cast<float>(uint32_t(lane_slots(lane ^ lane_mask).word[0]));
  warp_sync();
  return result;
}

inline float atomicAdd(float* address, float value) {  // fibers never interleave inside a call
  const float old = *address;
  *address = old + value;
  return old;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
