// Element conversions and 16-byte vector loads/stores shared by the CUDA kernels.
//
// A 16-byte vector travels as a uint4 (one 128-bit load or store) and is split into its elements
// by copying its bits (bit_copy), never by reading the uint4 through an Element pointer: that read
// breaks C++'s aliasing rule, and an optimising host compiler (the emulator's g++ -O2) does drop
// it, reading stale values. nvcc turns the copies into the same register moves.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastgpt::cuda {

template <typename T>
inline constexpr bool kIsFloat32 = std::is_same_v<T, float>;

// The bits of `from` as a To of the same size (C++20's std::bit_cast, which the emulator's C++17
// build lacks).
template <typename To, typename From>
__host__ __device__ __forceinline__ To bit_copy(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy keeps every bit");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

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

// The elements of a 16-byte vector as an array, and back.
template <typename Element>
struct VectorElements {
  Element values[kVecElems<Element>];
};

// The kVecElems elements of a 16-byte vector (kept packed to save registers) as floats.
template <typename Element>
__device__ __forceinline__ void unpack_vector(const uint4& raw, float (&out)[kVecElems<Element>]) {
  const VectorElements<Element> elements = bit_copy<VectorElements<Element>>(raw);
#pragma unroll
  for (int i = 0; i < kVecElems<Element>; ++i) out[i] = to_float(elements.values[i]);
}

// Loads kVecElems consecutive elements from a 16-byte aligned address, as floats. The emulator
// checks the alignment, where a GPU would fault (misaligned address).
template <typename Element>
__device__ __forceinline__ void load_vector(const Element* source, float (&out)[kVecElems<Element>]) {
#if defined(FASTGPT_EMULATION)
  if (reinterpret_cast<uintptr_t>(source) % 16 != 0) {
    ::fastgpt_emu::fail("a 16-byte vector load from an unaligned address");
  }
#endif
  unpack_vector<Element>(*reinterpret_cast<const uint4*>(source), out);
}

// Stores kVecElems floats, rounded to Element, to a 16-byte aligned address.
template <typename Element>
__device__ __forceinline__ void store_vector(Element* target, const float (&in)[kVecElems<Element>]) {
  VectorElements<Element> elements;
#pragma unroll
  for (int i = 0; i < kVecElems<Element>; ++i) elements.values[i] = from_float<Element>(in[i]);
  *reinterpret_cast<uint4*>(target) = bit_copy<uint4>(elements);
}

}  // namespace fastgpt::cuda
