// Element conversions and 16-byte vector loads/stores shared by the CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastgpt::cuda {

template <typename T>
inline constexpr bool kIsFloat32 = std::is_same_v<T, float>;

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so 16-bit types never convert implicitly.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename Element>
__device__ __forceinline__ Element from_float(float x) {
  if constexpr (std::is_same_v<Element, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// Elements per 16-byte vector: 8 (float16, bfloat16) or 4 (float32).
template <typename Element>
inline constexpr int kVecElems = 16 / int(sizeof(Element));

// The kVecElems elements of a 16-byte vector (kept packed to save registers) as floats.
template <typename Element>
__device__ __forceinline__ void unpack_vector(const uint4& raw, float (&out)[kVecElems<Element>]) {
  const Element* values = reinterpret_cast<const Element*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<Element>; ++i) out[i] = to_float(values[i]);
}

// Loads kVecElems consecutive elements from a 16-byte aligned address, as floats.
template <typename Element>
__device__ __forceinline__ void load_vector(const Element* source, float (&out)[kVecElems<Element>]) {
  unpack_vector<Element>(*reinterpret_cast<const uint4*>(source), out);
}

// Stores kVecElems floats, rounded to Element, to a 16-byte aligned address.
template <typename Element>
__device__ __forceinline__ void store_vector(Element* target, const float (&in)[kVecElems<Element>]) {
  uint4 raw;
  Element* values = reinterpret_cast<Element*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<Element>; ++i) values[i] = from_float<Element>(in[i]);
  *reinterpret_cast<uint4*>(target) = raw;
}

}  // namespace fastgpt::cuda
