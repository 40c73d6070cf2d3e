// CUDA implementations of fastgpt::rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd (schemas:
// csrc/ops.cpp): argument checks (csrc/checks.h), then the host glue of csrc/cuda/host.h
// (outputs, scratch, launch), shared with the emulator; the kernels are in rms_norm.cuh.
// Launches go to the current stream; scratch comes from the caching allocator (CUDA-graph safe).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/device_checks.h"
#include "cuda/host.h"

namespace fastgpt::cuda {
namespace {

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                     double eps, double offset) {
  const char* op = "fastgpt::rms_norm_fwd";
  check_rms_norm_inputs(op, x, weight, offset);
  check_eps(op, eps);
  check_norm_cuda_inputs(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  auto [y, sum, rstd] = run_rms_norm_fwd(x.contiguous(), std::nullopt, contiguous(weight), eps, offset,
                                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps, double offset) {
  const char* op = "fastgpt::add_rms_norm_fwd";
  check_rms_norm_inputs(op, x, weight, offset, &residual);
  check_eps(op, eps);
  check_norm_cuda_inputs(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  auto outputs = run_rms_norm_fwd(x.contiguous(), residual.contiguous(), contiguous(weight), eps, offset,
                                  c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                     double offset) {
  const char* op = "fastgpt::rms_norm_bwd";
  check_rms_norm_inputs(op, x, weight, offset);
  check_norm_bwd_inputs(op, grad_y, x, {{"rstd", &rstd}});
  check_norm_cuda_inputs(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  // Two blocks per SM stream through the rows; fewer when there are fewer row groups.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  auto grads = run_rms_norm_bwd(grad_y.contiguous(), x.contiguous(), contiguous(weight), rstd.contiguous(), offset,
                                2 * sms, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("rms_norm_fwd", &fastgpt::cuda::rms_norm_fwd_cuda);
  m.impl("add_rms_norm_fwd", &fastgpt::cuda::add_rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &fastgpt::cuda::rms_norm_bwd_cuda);
}
