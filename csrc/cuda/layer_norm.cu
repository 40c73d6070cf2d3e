// CUDA implementations of fastgpt::layer_norm_fwd / layer_norm_bwd (schemas:
// csrc/ops.cpp): argument checks (csrc/checks.h), then the host glue of csrc/cuda/host.h
// (outputs, scratch, launch), shared with the emulator; the kernels are in layer_norm.cuh.
// Launches go to the current stream; scratch comes from the caching allocator (CUDA-graph safe).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/device_checks.h"
#include "cuda/host.h"

namespace fastgpt::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  const char* op = "fastgpt::layer_norm_fwd";
  check_layer_norm_inputs(op, x, {{"weight", &weight}, {"bias", &bias}});
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  check_norm_cuda_inputs(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  auto outputs = run_layer_norm_fwd(x.contiguous(), weight.contiguous(), bias.contiguous(), eps,
                                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  const char* op = "fastgpt::layer_norm_bwd";
  check_layer_norm_inputs(op, x, {{"weight", &weight}});
  check_layer_norm_bwd_inputs(op, grad_y, x, mean, rstd);
  check_norm_cuda_inputs(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  // Two blocks per SM stream through the rows; fewer when there are fewer row groups.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  auto grads = run_layer_norm_bwd(grad_y.contiguous(), x.contiguous(), weight.contiguous(), mean.contiguous(),
                                  rstd.contiguous(), 2 * sms, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("layer_norm_fwd", &fastgpt::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastgpt::cuda::layer_norm_bwd_cuda);
}
