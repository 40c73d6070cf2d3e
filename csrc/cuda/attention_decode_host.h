// The attention forward's choice between the prefill kernel (attention_fwd.cuh) and the split-KV
// decode kernels (attention_decode.cuh), shared by the extension's wrapper (attention.cu) and the
// CPU emulator (emulator/emulator.cpp) so that both take the same path with the same split and
// workspace. Knows torch (the workspace comes from its allocator); argument checks stay in the
// wrappers (csrc/checks.h), apart from the decode grid's limits (check_decode_grid).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <optional>

#include "cuda/attention.h"
#include "cuda/host.h"

namespace fastgpt::cuda {

// Whether a forward with Tq queries per head takes the decode kernels.
inline bool is_decode(int64_t q_len) { return q_len <= kDecodeMaxQueries; }

inline AttentionDecodeLauncher pick_attention_decode_launcher(at::ScalarType dtype, int64_t head_dim) {
  const char* op = "fastgpt::attention_fwd";
  AttentionDecodeLauncher launcher = nullptr;
  dispatch_element_type(dtype, op, [&](auto element) {
    launcher = attention_decode_launcher_for<decltype(element)>(head_dim);
  });
  TORCH_CHECK(launcher != nullptr, op, ": head dim must be ", attention_head_dims_text(),
              " (the compiled CUDA kernels), got ", head_dim);
  return launcher;
}

// The decode launch grids: (B * Hkv, num_splits, row blocks) and the merge's 1-D grid of
// 128-thread blocks over the (B * Hq * Tq) x (D / 4) outputs.
inline void check_decode_grid(const char* op, int64_t batch, int64_t kv_heads, int64_t kv_group, int64_t q_len,
                              int64_t head_dim, int64_t num_splits) {
  TORCH_CHECK(batch * kv_heads <= INT_MAX, op, ": B * Hkv must be at most ", INT_MAX,
              " (the decode kernel's grid.x), got ", batch * kv_heads);
  const int64_t row_blocks = (kv_group * q_len + kDecodeRowsPerBlock - 1) / kDecodeRowsPerBlock;
  TORCH_CHECK(row_blocks <= 65535, op, ": (Hq / Hkv) * Tq must be at most ", 65535 * kDecodeRowsPerBlock,
              " for the decode kernel (grid.z: blocks of ", kDecodeRowsPerBlock, " rows), got ", kv_group * q_len);
  TORCH_CHECK(num_splits <= 65535, op, ": at most 65535 key chunks (the decode kernel's grid.y), got ", num_splits);
  const int64_t merge_blocks = (batch * kv_heads * kv_group * q_len * (head_dim / 4) + 127) / 128;
  TORCH_CHECK(num_splits == 1 || merge_blocks <= INT_MAX, op, ": B * Hq * Tq * D / 4 must be at most ",
              int64_t(INT_MAX) * 128, " (the decode merge's grid.x), got ", batch * kv_heads * kv_group * q_len * (head_dim / 4));
}

// Runs the decode kernels on `p` (its out and lse set) on `stream`: split by plan_attention_decode
// (`sm_count`; `chunk` > 0 forces the chunk), with the workspace of several splits from torch
// (`options`' device; on a GPU the caching allocator, which reuses it only after the kernels queued
// on the stream). `scratch_fill`: the emulator fills the workspace with NaN, so that a partial the
// decode kernel does not write shows. Returns the split used.
inline DecodeSplits run_attention_decode(const AttentionParams& p, at::ScalarType dtype,
                                         const at::TensorOptions& options, int sm_count, cudaStream_t stream,
                                         int chunk = 0, std::optional<float> scratch_fill = std::nullopt) {
  const AttentionDecodeLauncher launcher = pick_attention_decode_launcher(dtype, p.head_dim);
  DecodeSplits splits = plan_attention_decode(p, sm_count, chunk);
  check_decode_grid("fastgpt::attention_fwd", p.batch, p.kv_heads, p.kv_group, p.q_len, p.head_dim,
                    splits.num_splits);
  at::Tensor partial_out, partial_lse;
  if (splits.num_splits > 1) {
    const auto float_options = options.dtype(at::kFloat);
    const int64_t S = splits.num_splits, B = p.batch, H = p.heads, Tq = p.q_len, D = p.head_dim;
    partial_out = scratch_fill.has_value() ? at::full({S, B, H, Tq, D}, *scratch_fill, float_options)
                                           : at::empty({S, B, H, Tq, D}, float_options);  // (S, B, H, Tq, D)
    partial_lse = scratch_fill.has_value() ? at::full({S, B, H, Tq}, *scratch_fill, float_options)
                                           : at::empty({S, B, H, Tq}, float_options);     // (S, B, H, Tq)
    splits.partial_out = partial_out.data_ptr<float>();
    splits.partial_lse = partial_lse.data_ptr<float>();
  }
  launcher(p, splits, stream);
  return splits;
}

}  // namespace fastgpt::cuda
