// What the attention forward and backward kernels share: which (query, key) pairs are
// visible, and the dropout decision of csrc/philox.h.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/warp_mma.cuh"
#include "philox.h"

namespace fastgpt::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kLn2 = 0.693147180559945309f;

// Visibility of key `key` to query `query` of one (batch, head): inside the keys,
// causal (bottom-right aligned), the sliding window and the key padding mask. With
// p = query + causal_offset the query's position: causal sees key <= p, a window W > 0
// keeps p - W < key (causal) or |key - p| < W (non-causal).
struct Visibility {
  int k_len;
  int causal_offset;     // Tk - Tq: query i sees keys j <= i + causal_offset
  bool causal;
  int window;            // 0: none
  const bool* keep_key;  // (Tk,) row of the key padding mask for this batch, or nullptr

  __device__ __forceinline__ Visibility(const AttentionParams& p, int batch)
      : k_len(p.k_len),
        causal_offset(p.k_len - p.q_len),
        causal(p.causal),
        window(p.window),
        keep_key(p.key_padding_mask != nullptr ? p.key_padding_mask + int64_t(batch) * p.k_len : nullptr) {}

  __device__ __forceinline__ bool operator()(int query, int key) const {
    const int position = query + causal_offset;
    return key < k_len && (!causal || key <= position) && (window == 0 || key > position - window) &&
           (window == 0 || causal || key < position + window) && (keep_key == nullptr || keep_key[key]);
  }

  // Whether some pair of the query rows [query0, query0 + rows) and key columns
  // [key0, key0 + cols) is invisible, i.e. whether the tile needs masking at all (the
  // most restrictive row for the upper bounds is the first, for the window's lower bound the last).
  __device__ __forceinline__ bool tile_needs_mask(int query0, int rows, int key0, int cols) const {
    const int first = query0 + causal_offset, last = query0 + rows - 1 + causal_offset, key_last = key0 + cols - 1;
    return keep_key != nullptr || key0 + cols > k_len || (causal && key_last > first) ||
           (window > 0 && (key0 <= last - window || (!causal && key_last >= first + window)));
  }

  // Keys [begin, end) hold every key visible to some query of [query0, query0 + rows)
  // (clamped to [0, Tk]; begin >= end: none).
  __device__ __forceinline__ int key_begin(int query0) const {
    return window > 0 ? max(0, query0 + causal_offset - window + 1) : 0;
  }
  __device__ __forceinline__ int key_end(int query_last) const {
    const int position = query_last + causal_offset;
    if (causal) return max(0, min(k_len, position + 1));
    return window > 0 ? max(0, min(k_len, position + window)) : k_len;
  }
  // Queries [begin, end) hold every query that sees some key of [key0, key_last] (clamped to [0, q_len]).
  __device__ __forceinline__ int query_begin(int key0) const {
    const int lowest = causal ? key0 : (window > 0 ? key0 - window + 1 : INT_MIN / 2);
    return max(0, lowest - causal_offset);
  }
  __device__ __forceinline__ int query_end(int key_last, int q_len) const {
    if (window == 0) return q_len;
    return max(0, min(q_len, key_last + window - causal_offset));
  }
};

// The soft-capped score in log2 units of a raw q·k: softcap · tanh(scale · q·k / softcap) · log2(e),
// or scale · log2(e) · q·k without a cap.
__device__ __forceinline__ float score_log2(const AttentionParams& p, float qk) {
  return p.softcap > 0.0f ? p.softcap_log2 * tanhf(qk * p.scale_over_softcap) : qk * p.scale_log2;
}

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
