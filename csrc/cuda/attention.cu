// CUDA implementations of fastgpt::attention_fwd / attention_bwd (schemas: csrc/ops.cpp):
// argument checks, output allocation, and dispatch on dtype and head dim to the kernels
// of attention_{fwd,bwd}_<dtype>.cu. Everything runs on the current stream without host
// synchronisation or allocations outside the caching allocator, so the ops can be
// captured in CUDA graphs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/attention.h"
#include "cuda/host.h"
#include "cuda/device_checks.h"

namespace fastgpt::cuda {
namespace {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastgpt attention: q (B, H, Tq, D), k and v (B, H, Tk, D) must be 4-D, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "fastgpt attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "fastgpt attention: q and k, v must agree in B, H and D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fastgpt attention: q, k, v must share one dtype");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "fastgpt attention: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.size(2) < 65535LL * 64, "fastgpt CUDA attention: Tq too large for the launch grid");
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == k.size(0) &&
                    mask.size(1) == k.size(2) && mask.device() == q.device(),
                "fastgpt attention: key_padding_mask must be a bool (B, Tk) tensor on the device of q, got ",
                mask.scalar_type(), " ", mask.sizes());
  }
}

// A (B, H, T, D) tensor as the kernels read it: the last dim contiguous and every row
// starting on a 16-byte boundary (cp.async), else a contiguous copy.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t elements_per_16_bytes = 16 / t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) ok = ok && (t.size(dim) == 1 || t.stride(dim) % elements_per_16_bytes == 0);
  return ok ? t : t.contiguous();
}

std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double scale, double dropout_p, int64_t seed) {
  check_attention_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastgpt attention: dropout_p must be in [0, 1), got ", dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  check_compute_capability();
  const AttentionLauncher launcher = pick_attention_launcher(/*forward=*/true, q.scalar_type(), q.size(3));
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, H, Tq, D}, q.options());                    // (B, H, Tq, D)
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));     // (B, H, Tq)
  if (out.numel() == 0) return {out, lse};
  if (Tk == 0) {  // no key at all: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q_ = kernel_layout(q), k_ = kernel_layout(k), v_ = kernel_layout(v);
  const std::optional<at::Tensor> mask = contiguous_mask(key_padding_mask);
  AttentionParams p = make_attention_params(q_, k_, v_, mask, causal, scale, dropout_p, seed);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launcher(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed) {
  check_attention_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastgpt attention backward: grad_out and out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastgpt attention backward: grad_out and out must have the dtype of q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "fastgpt attention backward: lse must be float32 (B, H, Tq), got ", lse.scalar_type(), " ",
              lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "fastgpt attention backward: all tensors must be on the device of q");
  const c10::cuda::CUDAGuard guard(q.device());
  check_compute_capability();
  const AttentionLauncher launcher = pick_attention_launcher(/*forward=*/false, q.scalar_type(), q.size(3));
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_q = at::empty_like(q, contiguous), grad_k = at::empty_like(k, contiguous),
             grad_v = at::empty_like(v, contiguous);
  if (Tq == 0 || Tk == 0 || B * H * D == 0) {  // nothing flows anywhere
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor q_ = kernel_layout(q), k_ = kernel_layout(k), v_ = kernel_layout(v);
  const at::Tensor grad_out_ = kernel_layout(grad_out), out_ = out.contiguous(), lse_ = lse.contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(key_padding_mask);
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));             // (B, H, Tq)
  at::Tensor grad_q_accum = at::zeros({B, H, Tq, D}, q.options().dtype(at::kFloat));  // (B, H, Tq, D)
  AttentionParams p = make_attention_params(q_, k_, v_, mask, causal, scale, dropout_p, seed);
  set_attention_backward_params(p, grad_out_, out_, lse_, delta, grad_q_accum, grad_q, grad_k, grad_v);
  launcher(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_fwd", &fastgpt::cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &fastgpt::cuda::attention_bwd_cuda);
}
