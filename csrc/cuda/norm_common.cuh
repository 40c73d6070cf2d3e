// Pieces shared by the row-norm kernels (layer_norm.cuh, rms_norm.cuh): the block shape, the
// row reduction, the choice of kernel shape for a row, and the deterministic per-block partial
// sums of the column gradients (dweight, dbias), added up by a second kernel (no atomics).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/vector_io.cuh"

namespace fastgpt::cuda {

constexpr int kNormThreads = 256;  // threads per block of every norm kernel
constexpr int kNormMaxVecs = 4;    // vectors per thread on the vector path

// Sum of `value` over the kThreadsPerRow threads of a row: a warp (shuffles) or the
// whole block (shuffles, then one value per warp through `scratch`, >= 8 floats).
template <int kThreadsPerRow>
__device__ __forceinline__ float row_sum(float value, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if constexpr (kThreadsPerRow == 32) {
    return value;
  } else {
    static_assert(kThreadsPerRow == kNormThreads, "a row is a warp or the whole block");
    __syncthreads();  // the previous call's readers are done with scratch
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreadsPerRow / 32; ++w) total += scratch[w];
    return total;
  }
}

// Which kernel shape serves a row:
//   kWarp:    vectors, a warp per row (C <= 32 · kNormMaxVecs · kVec);
//   kBlock:   vectors, the whole block per row (C <= kNormThreads · kNormMaxVecs · kVec);
//   kGeneric: any C or alignment, one block per row, scalar loads.
enum class RowShape { kWarp, kBlock, kGeneric };

// `aligned`: every row pointer the kernel touches is 16-byte aligned.
template <typename Element>
RowShape row_shape_for(int cols, bool aligned) {
  constexpr int kVec = kVecElems<Element>;
  if (cols % kVec != 0 || !aligned) return RowShape::kGeneric;
  const int n_vecs = cols / kVec;
  if (n_vecs <= 32 * kNormMaxVecs) return RowShape::kWarp;
  if (n_vecs <= kNormThreads * kNormMaxVecs) return RowShape::kBlock;
  return RowShape::kGeneric;
}

inline bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// Writes a vector-path block's column shares `sums[k][j][i]` (column (part + j·kThreadsPerRow)·kVec
// + i of sum k) to its partial rows partial[k · cols + column], k < kSums. With warp rows the warps
// of a block hold the same columns: they add their shares in shared memory one after the other (a
// fixed order: the result does not depend on scheduling, unlike shared-memory atomics). All the
// block's threads must call it.
template <int kThreadsPerRow, int kSums, int kVec>
__device__ __forceinline__ void write_block_partials(const float (&sums)[kSums][kNormMaxVecs][kVec], float* partial,
                                                     int cols) {
  constexpr int kRowsPerBlock = kNormThreads / kThreadsPerRow;
  const int part = threadIdx.x % kThreadsPerRow, n_vecs = cols / kVec;
  if constexpr (kThreadsPerRow == 32) {
    // per block sums of C <= 32 · kNormMaxVecs · kVec columns
    __shared__ float block_sums[kSums][32 * kNormMaxVecs * kVec];
    for (int col = threadIdx.x; col < cols; col += kNormThreads) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) block_sums[k][col] = 0.0f;
    }
    for (int turn = 0; turn < kRowsPerBlock; ++turn) {
      __syncthreads();
      if (threadIdx.x / 32 != turn) continue;
#pragma unroll
      for (int j = 0; j < kNormMaxVecs; ++j) {
        const int vec = part + j * kThreadsPerRow;
        if (vec < n_vecs) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
#pragma unroll
            for (int k = 0; k < kSums; ++k) block_sums[k][vec * kVec + i] += sums[k][j][i];
          }
        }
      }
    }
    __syncthreads();
    for (int col = threadIdx.x; col < cols; col += kNormThreads) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) partial[int64_t(k) * cols + col] = block_sums[k][col];
    }
  } else {  // one row per block: each column belongs to exactly one thread
#pragma unroll
    for (int j = 0; j < kNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (vec < n_vecs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
#pragma unroll
          for (int k = 0; k < kSums; ++k) partial[int64_t(k) * cols + vec * kVec + i] = sums[k][j][i];
        }
      }
    }
  }
}

// Σ_b partial[(b · kSums + k) · cols + col] over the partial_rows blocks, in block order.
__device__ __forceinline__ float partial_column_sum(const float* partial, int partial_rows, int sums, int k, int cols,
                                                    int col) {
  float total = 0.0f;
  for (int b = 0; b < partial_rows; ++b) total += partial[(int64_t(b) * sums + k) * cols + col];
  return total;
}

}  // namespace fastgpt::cuda
