// CUDA implementations of fastgpt::attention_fwd / attention_bwd (schemas: csrc/ops.cpp):
// argument checks (csrc/checks.h), output allocation, and dispatch on dtype and head dim
// (csrc/cuda/host.h) to the kernels of attention_{fwd,bwd}_<dtype>.cu; a forward with
// Tq <= kDecodeMaxQueries takes the split-KV decode kernels of attention_decode_<dtype>.cu
// instead (csrc/cuda/attention_decode_host.h, split for the device's SM count). Everything runs on the current stream without host
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
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

#include "checks.h"
#include "cuda/attention.h"
#include "cuda/attention_decode_host.h"
#include "cuda/device_checks.h"
#include "cuda/host.h"

namespace fastgpt::cuda {
namespace {

// csrc/checks.h, plus what only the CUDA kernels need.
void check_cuda_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_padding_mask, double dropout_p, int64_t window,
                       double softcap) {
  check_attention_inputs(op, q, k, v, key_padding_mask, dropout_p, window, softcap);
  check_attention_features(op, "CUDA", /*gqa=*/true, /*window=*/true, /*softcap=*/true, q, k, window, softcap);
  TORCH_CHECK(q.is_cuda(), op, ": q, k and v must be CUDA tensors, got ", q.device());
  TORCH_CHECK(q.size(2) < 65535LL * 64, op, ": Tq must be below ", 65535LL * 64, " (the launch grid), got ",
              q.size(2));
}

// A (B, H, T, D) tensor as the kernels read it: the last dim contiguous and every row
// starting on a 16-byte boundary (cp.async), else a contiguous copy.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t elements_per_16_bytes = 16 / t.element_size();
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) ok = ok && (t.size(dim) == 1 || t.stride(dim) % elements_per_16_bytes == 0);
  return ok ? t : t.contiguous();
}

// The SM count of `device` (it sizes the decode split), queried once per device.
int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return counts[device] = count;
}

std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  return mask->contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double scale, double dropout_p, int64_t seed,
                                                      int64_t window, double softcap) {
  check_cuda_inputs("fastgpt::attention_fwd", q, k, v, key_padding_mask, dropout_p, window, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  check_compute_capability();
  const AttentionLauncher launcher = pick_attention_launcher(/*forward=*/true, q.scalar_type(), q.size(3));
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  const bool decode = is_decode(Tq);
  if (decode) check_decode_grid("fastgpt::attention_fwd", B, k.size(1), H / k.size(1), Tq, D, /*num_splits=*/1);
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
  AttentionParams p = make_attention_params(q_, k_, v_, mask, causal, scale, dropout_p, seed, window, softcap);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (decode) {
    run_attention_decode(p, q.scalar_type(), q.options(), multiprocessor_count(q.get_device()),
                         c10::cuda::getCurrentCUDAStream());
  } else {
    launcher(p, c10::cuda::getCurrentCUDAStream());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t window, double softcap, const std::optional<at::Tensor>& grad_lse) {
  check_cuda_inputs("fastgpt::attention_bwd", q, k, v, key_padding_mask, dropout_p, window, softcap);
  check_attention_bwd_inputs("fastgpt::attention_bwd", grad_out, q, out, lse, grad_lse);
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
  const at::Tensor grad_out_ = kernel_layout(grad_out), out_ = contiguous_aligned(out),
                   lse_ = lse.contiguous();
  const std::optional<at::Tensor> mask = contiguous_mask(key_padding_mask);
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));             // (B, H, Tq)
  at::Tensor grad_q_accum = at::zeros({B, H, Tq, D}, q.options().dtype(at::kFloat));  // (B, H, Tq, D)
  AttentionParams p = make_attention_params(q_, k_, v_, mask, causal, scale, dropout_p, seed, window, softcap);
  const std::optional<at::Tensor> grad_lse_ =
      grad_lse.has_value() ? std::optional<at::Tensor>(grad_lse->contiguous()) : std::nullopt;
  set_attention_backward_params(p, grad_out_, out_, lse_, grad_lse_, delta, grad_q_accum, grad_q, grad_k, grad_v);
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
