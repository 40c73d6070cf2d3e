// What the kernels need from the hardware, one thin wrapper each: kernel launches (their grids and
// shared-memory opt-in checked against CUDA's limits, with a clear error), the
// dynamic shared memory array, and the PTX instructions of the attention kernels (sm_80+):
// cp.async (asynchronous global -> shared copies), ldmatrix, mma.sync m16n8k16. Their data
// layouts are documented in warp_mma.cuh.
//
// Built with FASTGPT_EMULATION (CPU tests only, never in the extension), the same names
// come from emulator/ptx_emulation.h instead: host versions with the semantics of the
// PTX ISA, which run the kernels on the CPU for tests/test_cuda.py.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/vector_io.cuh"

namespace fastgpt::cuda {

// CUDA's launch limits: grid.x <= 2^31 - 1 blocks, grid.y and grid.z <= 65535; a block gets more
// than the default 48 KiB of dynamic shared memory only once its kernel opted in (allow_shared_memory).
inline constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
inline constexpr size_t kDefaultSharedMemoryBytes = 48 * 1024;

// The dim3 of a launch grid of (x, y, z) blocks, checked against CUDA's limits first: a count past
// them would wrap in the dim3's unsigned fields (too few blocks, silently) or fail the launch.
// `what` names the kernel and what its grid dims count, for the error.
inline dim3 launch_grid(const char* what, int64_t x, int64_t y = 1, int64_t z = 1) {
  if (x > kMaxGridX || y > kMaxGridYZ || z > kMaxGridYZ) {
    throw std::runtime_error(std::string("fastgpt: the launch grid of ") + what + " would be (" + std::to_string(x) +
                             ", " + std::to_string(y) + ", " + std::to_string(z) +
                             ") blocks, past CUDA's limits (x <= 2^31 - 1, y and z <= 65535)");
  }
  return dim3(unsigned(x), unsigned(y), unsigned(z));
}

}  // namespace fastgpt::cuda

#if defined(FASTGPT_EMULATION)
#include "cuda/emulator/ptx_emulation.h"
#else
namespace fastgpt::cuda {

// kernel<<<grid, block, smem_bytes, stream>>>(args...); never synchronises. Errors surface
// through cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK in the caller).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
}

// Sets the kernel's dynamic shared memory limit to `bytes`: "" on success, else CUDA's reason
// (the error is cleared, so that it does not surface at a later, unrelated check).
template <typename... Params>
inline std::string set_max_dynamic_shared_memory(void (*kernel)(Params...), size_t bytes) {
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (status == cudaSuccess) return {};
  (void)cudaGetLastError();
  return cudaGetErrorString(status);
}

// The kernel's dynamically sized shared memory (the launch's third <<<>>> argument).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes, or writes 16 zero bytes when !valid (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}

template <typename Element>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<Element, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<Element, __nv_bfloat16>, "tensor cores take float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace fastgpt::cuda
#endif

namespace fastgpt::cuda {

// Opts `kernel` (`what` names it for the error) in to `bytes` of dynamic shared memory from the
// default 48 KiB up (CUTLASS's `>=`: a block at exactly the default goes over it with any static
// shared memory), and fails clearly where the device refuses (an sm_80 block may opt in to at most
// 163 KiB, an sm_90 one to 227 KiB): the launch would fail with a less telling error.
template <typename... Params>
inline void allow_shared_memory(void (*kernel)(Params...), size_t bytes, const char* what) {
  if (bytes < kDefaultSharedMemoryBytes) return;
  const std::string error = set_max_dynamic_shared_memory(kernel, bytes);
  if (!error.empty()) {
    throw std::runtime_error(std::string("fastgpt: ") + what + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, which this GPU refused to grant "
                             "(cudaFuncSetAttribute: " + error + ")");
  }
}

}  // namespace fastgpt::cuda
