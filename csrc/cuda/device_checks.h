// Host-side checks shared by the CUDA op wrappers (attention.cu, layer_norm.cu, rms_norm.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <limits>

namespace fastgpt::cuda {

inline int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// The kernels use cp.async, ldmatrix and bfloat16 mma.sync: sm_80 or newer.
inline void check_compute_capability() {
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  TORCH_CHECK(major >= 8, "fastgpt CUDA kernels need compute capability 8.0 or newer (sm_80+: A100, H100, ",
              "RTX 30xx and later); this GPU is sm_", major, minor);
}

// The norms' rows (N, C) after csrc/checks.h: on the GPU, C within the kernels' int column index.
inline void check_norm_cuda_inputs(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int>::max(), op, ": C must be at most ",
              std::numeric_limits<int>::max(), ", got ", x.size(1));
}

}  // namespace fastgpt::cuda
