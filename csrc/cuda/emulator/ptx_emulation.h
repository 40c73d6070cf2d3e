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
#include <array>
#include <string>

namespace fastgpt::cuda {

// Runs the grid on the CPU, block after block (cuda_shim.h), before returning. As on a GPU, a
// block of more than the default 48 KiB of dynamic shared memory needs its kernel's opt-in.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                          const Args&... args) {
  const auto& opt_in = fastgpt_emu::runtime().shared_memory_opt_in;
  const auto found = opt_in.find(reinterpret_cast<const void*>(kernel));
  if (smem_bytes > kDefaultSharedMemoryBytes && (found == opt_in.end() || found->second < smem_bytes)) {
    throw std::runtime_error("emulator: a launch with " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory, more than its kernel opted in to");
  }
  fastgpt_emu::launch(grid, block, smem_bytes, [=] { kernel(args...); });
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) on the emulated
// device: refused past its max_shared_memory_per_block, with CUDA's reason.
template <typename... Params>
inline std::string set_max_dynamic_shared_memory(void (*kernel)(Params...), size_t bytes) {
  auto& rt = fastgpt_emu::runtime();
  if (bytes > rt.max_shared_memory_per_block) return "invalid argument";
  rt.shared_memory_opt_in[reinterpret_cast<const void*>(kernel)] = bytes;
  return {};
}

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

// ---- The fragment maps: which element of which matrix a lane's register holds (PTX ISA, "Matrix
// fragments for mma.m16n8k16" and "ldmatrix"). Both instructions below are written in terms of them,
// and tests/test_cuda.py checks every entry against CuTe's layouts (through fragment_maps in
// emulator.cpp). `half` is the 16-bit half of a 32-bit register (0: the low bits).
namespace emulation {

struct Element2 {
  int row, col;
};
struct BlockElement {
  int block, row, col;  // of the four stored 8 x 8 blocks (block b: the rows lanes 8b .. 8b + 7 point to)
};

// mma A (16 x 16, row x k): register r of lane l, half h.
inline Element2 mma_a_element(int lane, int reg, int half) {
  return {lane / 4 + 8 * (reg % 2), 2 * (lane % 4) + half + 8 * (reg / 2)};
}
// mma B (16 x 8, k x col): register r (b0, b1) of lane l, half h.
inline Element2 mma_b_element(int lane, int reg, int half) { return {2 * (lane % 4) + half + 8 * reg, lane / 4}; }
// mma C and D (16 x 8 float32, row x col): register r of lane l.
inline Element2 mma_c_element(int lane, int reg) { return {lane / 4 + 8 * (reg / 2), 2 * (lane % 4) + reg % 2}; }
// ldmatrix .x4: register r of lane l receives (row l / 4; columns 2(l % 4) + h) of block r, or with
// .trans its transpose, (rows 2(l % 4) + h; column l / 4).
inline BlockElement ldmatrix_element(bool transpose, int lane, int reg, int half) {
  if (transpose) return {reg, 2 * (lane % 4) + half, lane / 4};
  return {reg, lane / 4, 2 * (lane % 4) + half};
}

// The inverse of an mma operand's map: (lane, register, half) of every element of the operand.
struct FragmentSlot {
  int lane, reg, half;
};
template <int kRows, int kCols, int kRegs, class Map>
inline std::array<std::array<FragmentSlot, kCols>, kRows> slots_of(Map map) {
  std::array<std::array<FragmentSlot, kCols>, kRows> slots{};
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < kRegs; ++reg) {
      for (int half = 0; half < 2; ++half) {
        const Element2 e = map(lane, reg, half);
        slots[e.row][e.col] = {lane, reg, half};
      }
    }
  }
  return slots;
}
inline const auto& mma_a_slots() {
  static const auto slots = slots_of<16, 16, 4>(mma_a_element);
  return slots;
}
inline const auto& mma_b_slots() {
  static const auto slots = slots_of<16, 8, 2>(mma_b_element);
  return slots;
}

}  // namespace emulation

template <bool kTranspose>
inline void ldmatrix(uint32_t (&r)[4], const void* smem_row) {
  using namespace fastgpt_emu;
  emulation::check_shared(smem_row, 16, "ldmatrix");
  const int lane = thread_rank() % 32;
  lane_slots(lane).word[0] = reinterpret_cast<uintptr_t>(smem_row);
  warp_sync();
  auto element = [&](int reg, int half) {  // the 16 bits this lane receives there
    const emulation::BlockElement e = emulation::ldmatrix_element(kTranspose, lane, reg, half);
    return reinterpret_cast<const uint16_t*>(uintptr_t(lane_slots(8 * e.block + e.row).word[0]))[e.col];
  };
  for (int reg = 0; reg < 4; ++reg) r[reg] = uint32_t(element(reg, 0)) | (uint32_t(element(reg, 1)) << 16);
  warp_sync();
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix<false>(r, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ldmatrix<true>(r, smem_row); }

// D = A B + C for the warp, from the fragments each lane holds.
template <typename Element>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace fastgpt_emu;
  const int lane = thread_rank() % 32;
  LaneSlots& mine = lane_slots(lane);
  for (int r = 0; r < 4; ++r) mine.word[r] = a[r];
  mine.word[4] = b0;
  mine.word[5] = b1;
  warp_sync();
  auto half_of = [](uint64_t word, int half) { return uint16_t(half == 0 ? word & 0xffff : (word >> 16) & 0xffff); };
  auto A = [&](int row, int k) {
    const emulation::FragmentSlot s = emulation::mma_a_slots()[row][k];
    return emulation::element_to_float<Element>(half_of(lane_slots(s.lane).word[s.reg], s.half));
  };
  auto B = [&](int k, int col) {
    const emulation::FragmentSlot s = emulation::mma_b_slots()[k][col];
    return emulation::element_to_float<Element>(half_of(lane_slots(s.lane).word[4 + s.reg], s.half));
  };
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const emulation::Element2 at = emulation::mma_c_element(lane, e);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A(at.row, k) * B(k, at.col);
    d[e] = sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

}  // namespace fastgpt::cuda
