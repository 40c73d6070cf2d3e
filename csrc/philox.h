// Counter-based dropout RNG shared by the C++ and CUDA kernels, bit-identical to
// Triton's tl.rand(seed, offset) with a 32-bit offset (Philox-4x32, 10 rounds), so
// all three backends (and fastgpt/reference.py) drop exactly the same attention
// weights for the same seed. The backward pass regenerates the mask instead of
// storing it.
//
// Scheme (see csrc/ops.cpp): key = (seed, b * H + h), counter = (i * Tk + j, 0, 0, 0),
// keep P[b, h, i, j] iff uniform >= dropout_p. The counter is 32-bit: for
// Tq * Tk >= 2^32 it wraps and masks repeat across rows (documented limitation).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {

FASTGPT_HOST_DEVICE uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First 32-bit output of Philox-4x32-10 for counter (c0, 0, 0, 0) and key (k0, k1).
FASTGPT_HOST_DEVICE uint32_t philox_u32(uint32_t k0, uint32_t k1, uint32_t c0) {
  uint32_t c1 = 0, c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi_u32(0xCD9E8D57u, prev_c2) ^ c1 ^ k0;
    c2 = mulhi_u32(0xD2511F53u, prev_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * prev_c2;
    c3 = 0xD2511F53u * prev_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's uint_to_uniform_float: a float in [0, 1).
FASTGPT_HOST_DEVICE float uniform_from_u32(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;  // -x - 1 without overflow at INT32_MIN
  return static_cast<float>(x) * 4.6566127342e-10f;
}

FASTGPT_HOST_DEVICE bool dropout_keep(uint32_t seed, uint32_t head_index, uint32_t element,
                                      float dropout_p) {
  return uniform_from_u32(philox_u32(seed, head_index, element)) >= dropout_p;
}

}  // namespace fastgpt
