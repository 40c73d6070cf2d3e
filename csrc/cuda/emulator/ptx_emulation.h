// Host versions of the PTX wrappers of csrc/cuda/ptx.cuh (included from there when
// FASTGPT_EMULATION is defined, after cuda_shim.h). They follow the PTX ISA:
//   - cp.async: 16-byte copies (zero fill when !valid) that land at issue or, with
//     copy_at_wait, only when cp.async.wait_group retires their group;
//   - ldmatrix .x4 (.trans): lane l supplies row l % 8 of 8x8 block l / 8 and receives
//     (row l / 4, columns 2(l % 4), +1) of each block -- transposed with .trans;
//   - mma.m16n8k16 with the fragment layouts of "Matrix Fragments for mma.m16n8k16".
// Every shared-memory address is checked against the block's dynamic shared memory, and
// every cp.async source (and the decode kernel's vector loads) against the tensors the launcher
// registered.
#pragma once
#include <string>

namespace fastgpt::cuda {

// Runs the grid on the CPU, block after block (cuda_shim.h), before returning.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                          const Args&... args) {
  fastgpt_emu::launch(grid, block, smem_bytes, [=] { kernel(args...); });
}

template <typename... Params>
inline void allow_shared_memory(void (*)(Params...), size_t) {}

__device__ __forceinline__ unsigned char* dynamic_smem() { return fastgpt_emu::runtime().dynamic_smem.data(); }

namespace emulation {

inline void check_shared(const void* address, size_t bytes, const char* what) {
  auto& smem = fastgpt_emu::runtime().dynamic_smem;
  const auto* p = static_cast<const unsigned char*>(address);
  if (p < smem.data() || p + bytes > smem.data() + smem.size() - 16) {
    fastgpt_emu::fail(std::string(what) + ": shared-memory address out of bounds");
  } else if ((p - smem.data()) % 16 != 0) {
    fastgpt_emu::fail(std::string(what) + ": shared-memory address not 16-byte aligned");
  }
}

// A 16-byte global read (`what`: cp.async, or a kernel's vector load) must be aligned and lie
// inside one of the tensors the launcher registered.
inline void check_global(const void* address, const char* what = "cp.async") {
  const auto* p = static_cast<const unsigned char*>(address);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fastgpt_emu::fail(std::string(what) + " source not 16-byte aligned");
  for (const auto& range : fastgpt_emu::runtime().global_ranges) {
    const auto* begin = static_cast<const unsigned char*>(range.begin);
    if (p >= begin && p + 16 <= begin + range.bytes) return;
  }
  fastgpt_emu::fail(std::string(what) + " reads outside every input tensor");
}

inline void perform(const fastgpt_emu::Copy& copy) {
  if (copy.valid) {
    std::memcpy(copy.dst, copy.src, 16);
  } else {
    std::memset(copy.dst, 0, 16);
  }
}

template <typename Element>
inline float element_to_float(uint16_t bits) {
  Element value;
  std::memcpy(&value, &bits, 2);
  return to_float(value);
}

}  // namespace emulation

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  emulation::check_shared(smem, 16, "cp.async");
  if (valid) emulation::check_global(gmem);
  const fastgpt_emu::Copy copy{smem, gmem, valid};
  if (fastgpt_emu::runtime().copy_at_wait) {
    fastgpt_emu::runtime().current->open_group.push_back(copy);
  } else {
    emulation::perform(copy);
  }
}

inline void cp_async_commit() {
  auto* fiber = fastgpt_emu::runtime().current;
  fiber->groups.push_back(std::move(fiber->open_group));
  fiber->open_group.clear();
}

template <int kPending>
inline void cp_async_wait() {
  auto& groups = fastgpt_emu::runtime().current->groups;
  while (int(groups.size()) > kPending) {
    for (const auto& copy : groups.front()) emulation::perform(copy);
    groups.erase(groups.begin());
  }
}

template <bool kTranspose>
inline void ldmatrix(uint32_t (&r)[4], const void* smem_row) {
  using namespace fastgpt_emu;
  emulation::check_shared(smem_row, 16, "ldmatrix");
  const int lane = thread_rank() % 32;
  lane_slots(lane).word[0] = reinterpret_cast<uintptr_t>(smem_row);
  warp_sync();
  auto row = [&](int block, int index) {
    return reinterpret_cast<const uint16_t*>(uintptr_t(lane_slots(8 * block + index).word[0]));
  };
  for (int block = 0; block < 4; ++block) {
    uint16_t lo, hi;
    if (kTranspose) {  // (rows 2(l % 4), 2(l % 4) + 1; column l / 4) of the stored block
      lo = row(block, 2 * (lane % 4))[lane / 4];
      hi = row(block, 2 * (lane % 4) + 1)[lane / 4];
    } else {           // (row l / 4; columns 2(l % 4), 2(l % 4) + 1)
      lo = row(block, lane / 4)[2 * (lane % 4)];
      hi = row(block, lane / 4)[2 * (lane % 4) + 1];
    }
    r[block] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix<false>(r, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ldmatrix<true>(r, smem_row); }

// D = A B + C for the warp, from the fragments each lane holds.
template <typename Element>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace fastgpt_emu;
  const int lane = thread_rank() % 32, g = lane / 4, t = lane % 4;
  LaneSlots& mine = lane_slots(lane);
  for (int r = 0; r < 4; ++r) mine.word[r] = a[r];
  mine.word[4] = b0;
  mine.word[5] = b1;
  warp_sync();
  auto half_of = [](uint64_t word, int k) { return uint16_t(k % 2 == 0 ? word & 0xffff : (word >> 16) & 0xffff); };
  // A[row][k]: held by lane 4 (row % 8) + (k % 8) / 2 in register (row >= 8) + 2 (k >= 8).
  auto A = [&](int row, int k) {
    const LaneSlots& owner = lane_slots(4 * (row % 8) + (k % 8) / 2);
    return emulation::element_to_float<Element>(half_of(owner.word[(row >= 8) + 2 * (k >= 8)], k));
  };
  // B[k][col]: held by lane 4 col + (k % 8) / 2 in register b0 (k < 8) or b1.
  auto B = [&](int k, int col) {
    const LaneSlots& owner = lane_slots(4 * col + (k % 8) / 2);
    return emulation::element_to_float<Element>(half_of(owner.word[4 + (k >= 8)], k));
  };
  float d[4];
  for (int e = 0; e < 4; ++e) {  // c[e] is D[g + 8 (e / 2)][2t + e % 2]
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[e] = sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

}  // namespace fastgpt::cuda
