// CUDA implementations of fastgpt::layer_norm_fwd / layer_norm_bwd (schemas:
// csrc/ops.cpp); the kernels are in layer_norm_kernels.cuh. Launches go to the current
// stream; scratch comes from the caching allocator (CUDA-graph safe).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "cuda/device_checks.h"
#include "cuda/host.h"
#include "cuda/layer_norm_kernels.cuh"

namespace fastgpt::cuda {
namespace {

void check_layer_norm_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "fastgpt layer norm: x must be (N, C) with C >= 1, got ", x.sizes());
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int>::max(), "fastgpt layer norm: C too large");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1),
              "fastgpt layer norm: weight must be (C,) = (", x.size(1), ",), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastgpt layer norm: weight must have the dtype of x (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(), "fastgpt layer norm: tensors must be on one CUDA device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  check_layer_norm_inputs(x, weight);
  TORCH_CHECK(bias.sizes() == weight.sizes() && bias.scalar_type() == x.scalar_type() && bias.device() == x.device(),
              "fastgpt layer norm: bias must be (C,) like weight, in the dtype and on the device of x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  const at::Tensor x_ = x.contiguous(), weight_ = weight.contiguous(), bias_ = bias.contiguous();
  const int64_t N = x.size(0);
  at::Tensor y = at::empty_like(x_);                                   // (N, C)
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));     // (N,)
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));     // (N,)
  if (N == 0) return {y, mean, rstd};
  LayerNormParams p{};
  p.x = x_.data_ptr(), p.weight = weight_.data_ptr(), p.bias = bias_.data_ptr(), p.y = y.data_ptr();
  p.mean = mean.data_ptr<float>(), p.rstd = rstd.data_ptr<float>();
  p.rows = N, p.cols = int(x.size(1)), p.eps = float(eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_type(x.scalar_type(), "layer norm",
                        [&](auto element) { launch_layer_norm_fwd<decltype(element)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  check_layer_norm_inputs(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "fastgpt layer norm backward: grad_y must match x ", x.sizes(), ", got ", grad_y.sizes());
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->dim() == 1 && stat->size(0) == x.size(0) &&
                    stat->device() == x.device(),
                "fastgpt layer norm backward: mean and rstd must be float32 (N,) = (", x.size(0), ",)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_compute_capability();
  const at::Tensor x_ = x.contiguous(), grad_y_ = grad_y.contiguous(), weight_ = weight.contiguous();
  const at::Tensor mean_ = mean.contiguous(), rstd_ = rstd.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor grad_x = at::empty_like(x_);          // (N, C)
  at::Tensor grad_weight = at::empty_like(weight_);  // (C,)
  at::Tensor grad_bias = at::empty_like(weight_);    // (C,)
  LayerNormParams p{};
  p.x = x_.data_ptr(), p.weight = weight_.data_ptr(), p.grad_y = grad_y_.data_ptr(), p.grad_x = grad_x.data_ptr();
  p.mean = mean_.data_ptr<float>(), p.rstd = rstd_.data_ptr<float>();
  p.grad_weight = grad_weight.data_ptr(), p.grad_bias = grad_bias.data_ptr();
  p.rows = N, p.cols = int(C);
  if (N == 0) {
    grad_weight.zero_(), grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  // Two blocks per SM stream through the rows; fewer when there are fewer row groups.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_element_type(x.scalar_type(), "layer norm", [&](auto element) {
    using Element = decltype(element);
    const RowShape shape = row_shape<Element>(p);
    const int64_t rows_per_block = shape == RowShape::kWarp ? kLayerNormThreads / 32 : 1;
    p.partial_rows = int(std::min<int64_t>(2 * sms, (N + rows_per_block - 1) / rows_per_block));
    const auto options = x.options().dtype(at::kFloat);
    at::Tensor partial = shape == RowShape::kGeneric ? at::zeros({p.partial_rows, 2, C}, options)
                                                     : at::empty({p.partial_rows, 2, C}, options);
    p.partial = partial.data_ptr<float>();  // (partial_rows, 2, C), freed to the caching allocator on return
    launch_layer_norm_bwd<Element>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("layer_norm_fwd", &fastgpt::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastgpt::cuda::layer_norm_bwd_cuda);
}
