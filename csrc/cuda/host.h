// Host-side glue between torch tensors and the kernels, shared by the extension's wrappers
// (attention.cu, layer_norm.cu) and the CPU emulator of the kernels (emulator/emulator.cpp),
// so both pick the same instantiations and hand them exactly the same parameters.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>

#include "cuda/attention.h"

namespace fastgpt::cuda {

// Calls fn(Element{}) with the kernel element type of `dtype`; `op` names the op in the error.
template <typename Fn>
void dispatch_element_type(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kHalf: return fn(__half{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    case at::kFloat: return fn(float{});
    default: TORCH_CHECK(false, "fastgpt CUDA ", op, " supports float16, bfloat16 and float32, got ", dtype);
  }
}

inline AttentionLauncher pick_attention_launcher(bool forward, at::ScalarType dtype, int64_t head_dim) {
  AttentionLauncher launcher = nullptr;
  dispatch_element_type(dtype, "attention", [&](auto element) {
    launcher = attention_launcher_for<decltype(element)>(forward, head_dim);
  });
  TORCH_CHECK(launcher != nullptr, "fastgpt CUDA attention supports head dims 16, 32, 64 and 128, got ", head_dim);
  return launcher;
}

// q (B, H, Tq, D), k, v (B, H, Tk, D) with a contiguous last dim; mask (B, Tk) contiguous.
inline AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, bool causal, double scale,
                                             double dropout_p, int64_t seed) {
  AttentionParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.key_padding_mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.batch = int(q.size(0)), p.heads = int(q.size(1)), p.q_len = int(q.size(2)), p.k_len = int(k.size(2));
  p.causal = causal;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.dropout_p = float(dropout_p);
  p.dropout_scale = float(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint32_t>(seed);  // Philox key word 0 is the seed modulo 2^32 (csrc/philox.h)
  return p;
}

// The backward's extra tensors: grad_out (B, H, Tq, D) with a contiguous last dim; out, the
// gradients and grad_q_accum (float32) contiguous; lse, delta (B, H, Tq) float32.
inline void set_attention_backward_params(AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& lse, at::Tensor& delta, at::Tensor& grad_q_accum,
                                          at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  p.grad_out = grad_out.data_ptr();
  p.grad_out_batch_stride = grad_out.stride(0), p.grad_out_head_stride = grad_out.stride(1),
  p.grad_out_row_stride = grad_out.stride(2);
  p.saved_out = out.data_ptr();
  p.saved_lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.grad_q_accum = grad_q_accum.data_ptr<float>();
  p.grad_q = grad_q.data_ptr(), p.grad_k = grad_k.data_ptr(), p.grad_v = grad_v.data_ptr();
}

}  // namespace fastgpt::cuda
