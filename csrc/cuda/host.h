// Host-side glue between torch tensors and the kernels, shared by the extension's wrappers
// (attention.cu, layer_norm.cu, rms_norm.cu) and the CPU emulator of the kernels (emulator/emulator.cpp),
// so both pick the same instantiations, hand them exactly the same parameters and allocate
// the same outputs and scratch. Argument checks are not here: csrc/checks.h (the wrappers).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/attention.h"
#include "cuda/layer_norm.cuh"
#include "cuda/rms_norm.cuh"

namespace fastgpt::cuda {

// Calls fn(Element{}) with the kernel element type of `dtype`; `op` names the op in the error.
template <typename Fn>
void dispatch_element_type(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kHalf: return fn(__half{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    case at::kFloat: return fn(float{});
    default: TORCH_CHECK(false, op, ": dtype must be float16, bfloat16 or float32 (the CUDA kernels), got ", dtype);
  }
}

// "16, 32, 64, 80, 96, 128 or 256": the supported head dims of attention.h, for error messages.
inline std::string attention_head_dims_text() {
  const std::vector<int> dims(std::begin(kAttentionHeadDims), std::end(kAttentionHeadDims) - 1);
  return c10::Join(", ", dims) + " or " + std::to_string(kAttentionHeadDims[std::size(kAttentionHeadDims) - 1]);
}

inline AttentionLauncher pick_attention_launcher(bool forward, at::ScalarType dtype, int64_t head_dim) {
  const char* op = forward ? "fastgpt::attention_fwd" : "fastgpt::attention_bwd";
  AttentionLauncher launcher = nullptr;
  dispatch_element_type(dtype, op, [&](auto element) {
    launcher = attention_launcher_for<decltype(element)>(forward, head_dim);
  });
  TORCH_CHECK(launcher != nullptr, op, ": head dim must be ", attention_head_dims_text(),
              " (the compiled CUDA kernels), got ", head_dim);
  return launcher;
}

// q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) with a contiguous last dim, Hq % Hkv == 0; mask (B, Tk)
// contiguous; window 0 / softcap 0 = none.
inline AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, bool causal, double scale,
                                             double dropout_p, int64_t seed, int64_t window, double softcap) {
  AttentionParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.head_dim = int(q.size(3));
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.key_padding_mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.batch = int(q.size(0)), p.heads = int(q.size(1)), p.q_len = int(q.size(2)), p.k_len = int(k.size(2));
  p.kv_heads = int(k.size(1)), p.kv_group = int(q.size(1) / std::max<int64_t>(k.size(1), 1));
  p.causal = causal;
  p.window = int(std::min<int64_t>(std::max<int64_t>(window, 0), int64_t(1) << 30));
  p.softcap = softcap > 0.0 ? float(softcap) : 0.0f;
  p.softcap_log2 = softcap > 0.0 ? float(softcap * 1.4426950408889634) : 0.0f;
  p.scale_over_softcap = softcap > 0.0 ? float(scale / softcap) : 0.0f;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.dropout_p = float(dropout_p);
  p.dropout_scale = float(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint32_t>(seed);  // Philox key word 0 is the seed modulo 2^32 (csrc/philox.h)
  return p;
}

// t contiguous with its first element on a 16-byte boundary, else a contiguous copy (a fresh
// allocation, aligned): the backward's delta kernel reads the saved out with 16-byte vector loads,
// and a contiguous view may start anywhere in its storage.
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  if (t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// The backward's extra tensors: grad_out (B, H, Tq, D) with a contiguous last dim; out, the
// gradients and grad_q_accum (float32) contiguous; lse, delta and grad_lse (B, H, Tq) float32
// (grad_lse absent when nothing differentiates through lse).
inline void set_attention_backward_params(AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                                          at::Tensor& delta, at::Tensor& grad_q_accum,
                                          at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  p.grad_out = grad_out.data_ptr();
  p.grad_out_batch_stride = grad_out.stride(0), p.grad_out_head_stride = grad_out.stride(1),
  p.grad_out_row_stride = grad_out.stride(2);
  p.saved_out = out.data_ptr();
  p.saved_lse = lse.data_ptr<float>();
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.grad_q_accum = grad_q_accum.data_ptr<float>();
  p.grad_q = grad_q.data_ptr(), p.grad_k = grad_k.data_ptr(), p.grad_v = grad_v.data_ptr();
}

// ---- layer norm

// x (N, C), weight, bias (C,) contiguous in one dtype -> y (N, C) contiguous, mean, rstd (N,)
// float32, launched on `stream`.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> run_layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps,
                                                                         cudaStream_t stream) {
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x);                                // (N, C)
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));  // (N,)
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));  // (N,)
  if (N == 0) return {y, mean, rstd};
  LayerNormParams p{};
  p.x = x.data_ptr(), p.weight = weight.data_ptr(), p.bias = bias.data_ptr(), p.y = y.data_ptr();
  p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.rows = N, p.cols = int(x.size(1)), p.eps = float(eps);
  dispatch_element_type(x.scalar_type(), "fastgpt::layer_norm_fwd",
                        [&](auto element) { launch_layer_norm_fwd<decltype(element)>(p, stream); });
  return {y, mean, rstd};
}

// grad_y, x (N, C), weight (C,) contiguous, mean, rstd (N,) float32 contiguous -> grad_x (N, C),
// grad_weight, grad_bias (C,), launched on `stream` with at most `max_blocks` row blocks. The
// scratch of per-block partial sums comes from torch (on a GPU the caching allocator, which
// reuses it only after the kernels queued on the stream); what the kernels overwrite entirely
// is allocated uninitialised, or filled with `scratch_fill` (the emulator fills NaN, so that a
// kernel that does not overwrite it shows).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> run_layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t max_blocks, cudaStream_t stream, std::optional<float> scratch_fill = std::nullopt) {
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor grad_x = at::empty_like(x);             // (N, C)
  at::Tensor grad_weight = at::empty_like(weight);   // (C,)
  at::Tensor grad_bias = at::empty_like(weight);     // (C,)
  if (N == 0) {
    grad_weight.zero_(), grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  LayerNormParams p{};
  p.x = x.data_ptr(), p.weight = weight.data_ptr(), p.grad_y = grad_y.data_ptr(), p.grad_x = grad_x.data_ptr();
  p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.grad_weight = grad_weight.data_ptr(), p.grad_bias = grad_bias.data_ptr();
  p.rows = N, p.cols = int(C);
  dispatch_element_type(x.scalar_type(), "fastgpt::layer_norm_bwd", [&](auto element) {
    using Element = decltype(element);
    const RowShape shape = row_shape<Element>(p);
    const int64_t rows_per_block = shape == RowShape::kWarp ? kLayerNormThreads / 32 : 1;
    p.partial_rows = int(std::min<int64_t>(max_blocks, (N + rows_per_block - 1) / rows_per_block));
    const auto options = x.options().dtype(at::kFloat);
    at::Tensor partial = shape == RowShape::kGeneric ? at::zeros({p.partial_rows, 2, C}, options)  // accumulated
                         : scratch_fill.has_value() ? at::full({p.partial_rows, 2, C}, *scratch_fill, options)
                                                    : at::empty({p.partial_rows, 2, C}, options);
    p.partial = partial.data_ptr<float>();  // (partial_rows, 2, C)
    launch_layer_norm_bwd<Element>(p, stream);
  });
  return {grad_x, grad_weight, grad_bias};
}

// ---- RMSNorm

// x (N, C), residual (N, C) or None (rms_norm), weight (C,) or None, contiguous in one dtype ->
// y (N, C), sum (N, C) (x + residual; undefined without a residual), rstd (N,) float32, launched on `stream`.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> run_rms_norm_fwd(const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& residual,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       double eps, double offset,
                                                                       cudaStream_t stream) {
  const int64_t N = x.size(0);
  const char* op = residual.has_value() ? "fastgpt::add_rms_norm_fwd" : "fastgpt::rms_norm_fwd";
  at::Tensor y = at::empty_like(x);                                    // (N, C)
  at::Tensor sum = residual.has_value() ? at::empty_like(x) : at::Tensor();  // (N, C)
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));      // (N,)
  dispatch_element_type(x.scalar_type(), op, [&](auto) {});  // the dtype check, also for N == 0
  if (N == 0) return {y, sum, rstd};
  RmsNormParams p{};
  p.x = x.data_ptr(), p.y = y.data_ptr(), p.rstd = rstd.data_ptr<float>();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.sum = residual.has_value() ? sum.data_ptr() : nullptr;
  p.weight = weight.has_value() ? weight->data_ptr() : nullptr;
  p.rows = N, p.cols = int(x.size(1)), p.eps = float(eps), p.offset = float(offset);
  dispatch_element_type(x.scalar_type(), op,
                        [&](auto element) { launch_rms_norm_fwd<decltype(element)>(p, stream); });
  return {y, sum, rstd};
}

// grad_y, x (N, C), weight (C,) or None contiguous, rstd (N,) float32 contiguous -> grad_x (N, C),
// grad_weight (C,) (empty (0,) without a weight), launched on `stream` with at most `max_blocks`
// row blocks; scratch as run_layer_norm_bwd's (`scratch_fill`: the emulator's NaN).
inline std::tuple<at::Tensor, at::Tensor> run_rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& rstd, double offset, int64_t max_blocks,
                                                           cudaStream_t stream,
                                                           std::optional<float> scratch_fill = std::nullopt) {
  const int64_t N = x.size(0), C = x.size(1);
  const char* op = "fastgpt::rms_norm_bwd";
  at::Tensor grad_x = at::empty_like(x);                                  // (N, C)
  at::Tensor grad_weight = at::empty({weight.has_value() ? C : 0}, x.options());  // (C,) or (0,)
  dispatch_element_type(x.scalar_type(), op, [&](auto) {});
  if (N == 0) {
    grad_weight.zero_();
    return {grad_x, grad_weight};
  }
  RmsNormParams p{};
  p.x = x.data_ptr(), p.grad_y = grad_y.data_ptr(), p.grad_x = grad_x.data_ptr();
  p.weight = weight.has_value() ? weight->data_ptr() : nullptr;
  p.rstd = rstd.data_ptr<float>();
  p.grad_weight = weight.has_value() ? grad_weight.data_ptr() : nullptr;
  p.rows = N, p.cols = int(C), p.offset = float(offset);
  dispatch_element_type(x.scalar_type(), op, [&](auto element) {
    using Element = decltype(element);
    const RowShape shape = row_shape<Element>(p);
    const int64_t rows_per_block = shape == RowShape::kWarp ? kNormThreads / 32 : 1;
    p.partial_rows = int(std::min<int64_t>(max_blocks, (N + rows_per_block - 1) / rows_per_block));
    at::Tensor partial;
    if (weight.has_value()) {
      const auto options = x.options().dtype(at::kFloat);
      partial = shape == RowShape::kGeneric ? at::zeros({p.partial_rows, C}, options)  // accumulated
                : scratch_fill.has_value()  ? at::full({p.partial_rows, C}, *scratch_fill, options)
                                            : at::empty({p.partial_rows, C}, options);
      p.partial = partial.data_ptr<float>();  // (partial_rows, C)
    }
    launch_rms_norm_bwd<Element>(p, stream);
  });
  return {grad_x, grad_weight};
}

}  // namespace fastgpt::cuda
