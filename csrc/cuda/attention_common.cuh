// What the attention forward and backward kernels share: which (query, key) pairs are
// visible, and the dropout decision of csrc/philox.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/warp_mma.cuh"
#include "philox.h"

namespace fastgpt::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kLn2 = 0.693147180559945309f;

// Visibility of key `key` to query `query` of one (batch, head): inside the keys,
// causal (bottom-right aligned) and the key padding mask.
struct Visibility {
  int k_len;
  int causal_offset;     // Tk - Tq: query i sees keys j <= i + causal_offset
  bool causal;
  const bool* keep_key;  // (Tk,) row of the key padding mask for this batch, or nullptr

  __device__ __forceinline__ Visibility(const AttentionParams& p, int batch)
      : k_len(p.k_len),
        causal_offset(p.k_len - p.q_len),
        causal(p.causal),
        keep_key(p.key_padding_mask != nullptr ? p.key_padding_mask + int64_t(batch) * p.k_len : nullptr) {}

  __device__ __forceinline__ bool operator()(int query, int key) const {
    return key < k_len && (!causal || key <= query + causal_offset) && (keep_key == nullptr || keep_key[key]);
  }

  // Whether some pair of the query rows [query0, query0 + rows) and key columns
  // [key0, key0 + cols) is invisible, i.e. whether the tile needs masking at all
  // (the most restrictive causal row of a tile is its first).
  __device__ __forceinline__ bool tile_needs_mask(int query0, int key0, int cols) const {
    return keep_key != nullptr || key0 + cols > k_len || (causal && key0 + cols - 1 > query0 + causal_offset);
  }
};

// Dropout keeps P[b, h, i, j] iff philox_uniform(seed, b * H + h, i * Tk + j) >= p,
// with the element counter taken modulo 2^32 (csrc/ops.cpp, csrc/philox.h).
__device__ __forceinline__ bool dropout_keeps(const AttentionParams& p, int batch_head, int query, int key) {
  const uint32_t element = static_cast<uint32_t>(int64_t(query) * p.k_len + key);
  return fastgpt::dropout_keep(p.seed, static_cast<uint32_t>(batch_head), element, p.dropout_p);
}

template <typename T>
__device__ __forceinline__ const T* offset_pointer(const void* base, int batch, int head, int64_t batch_stride,
                                                  int64_t head_stride) {
  return static_cast<const T*>(base) + batch * batch_stride + head * head_stride;
}

}  // namespace fastgpt::cuda
