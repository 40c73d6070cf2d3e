// bfloat16 dot products on the CPU (AVX-512 BF16: vdpbf16ps), for the attention forward.
//
// vdpbf16ps takes two vectors of 32 bfloat16 and, lane by lane, adds the dot product of each
// lane's *pair* of elements to a float32 accumulator: acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1].
// The products of two bfloat16 are exact in float32 and the sums are float32, so the scores
// q · k come out as accurate as a float32 product of the bfloat16 inputs, at twice the
// multiply-adds per instruction of a float32 FMA. The price is the layout: the reduction
// dimension must come in pairs, packed as one 32-bit word (low half: the even element).
//   scores  S (keys, lanes)  = Σ_t  kword(key, t) · qword(t, lane)   over t < ceil(D / 2):
//           a key row of bfloat16 already is its words; the queries are packed as (D/2, W) words.
//   output  O (D, lanes)    += Σ_u  vword(d, u) · pword(u, lane)    over key pairs u:
//           v is packed per key pair (D, keys/2), the probabilities P (kept in float32 for the
//           softmax) are rounded to bfloat16 and interleaved in pairs of keys, as FlashAttention
//           rounds P to the input dtype before its P·V product.
// Odd D or an odd number of keys is padded with a zero bfloat16.
//
// The kernels are compiled for AVX-512 BF16 with a function-level target, inside the AVX-512
// level (whose other code must still run on AVX-512 CPUs without BF16, e.g. Skylake-X or Ice
// Lake): callers check has_bf16_dot() at run time.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__)
#include <immintrin.h>
#define FASTGPT_BF16_DOT 1
#endif

namespace fastgpt {
namespace {

inline uint32_t bf16_word(c10::BFloat16 even, c10::BFloat16 odd) {
  return static_cast<uint32_t>(even.x) | (static_cast<uint32_t>(odd.x) << 16);
}

#if defined(FASTGPT_BF16_DOT)

constexpr bool kBf16DotBuilt = true;

// Whether this CPU executes vdpbf16ps (checked once).
inline bool has_bf16_dot() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

constexpr int64_t kDotLanes = 32;  // columns of one dot block: two vectors of 16 float32 lanes
constexpr int kDotRows = 8;        // 8 rows x 2 vectors = 16 accumulators of AVX-512's 32 registers

#define FASTGPT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// C (R rows, 32 lanes) = c_scale · Σ_t a(r, t) · b(t, :) [+ C], with words a(r, t) = a[r * a_row + t]
// (broadcast) and b(t, :) = b[t * b_step .. + 32] (two vectors).
template <int R, bool kAccumulate>
FASTGPT_BF16_TARGET inline void dot_pairs_rows(int64_t pairs, const uint32_t* a, int64_t a_row, const uint32_t* b,
                                               int64_t b_step, float* c, int64_t c_row, float c_scale) {
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v)
      acc[r][v] = kAccumulate ? _mm512_loadu_ps(c + r * c_row + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + t * b_step);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + t * b_step + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row + t]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  const __m512 scale = _mm512_set1_ps(c_scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v)
      _mm512_storeu_ps(c + r * c_row + 16 * v, kAccumulate ? acc[r][v] : _mm512_mul_ps(acc[r][v], scale));
}

template <bool kAccumulate, int R = kDotRows - 1>
FASTGPT_BF16_TARGET inline void dot_pairs_tail(int64_t rows, int64_t pairs, const uint32_t* a, int64_t a_row,
                                               const uint32_t* b, int64_t b_step, float* c, int64_t c_row,
                                               float c_scale) {
  if constexpr (R >= 1) {
    if (rows == R)
      dot_pairs_rows<R, kAccumulate>(pairs, a, a_row, b, b_step, c, c_row, c_scale);
    else
      dot_pairs_tail<kAccumulate, R - 1>(rows, pairs, a, a_row, b, b_step, c, c_row, c_scale);
  }
}

// C (rows, 32) = c_scale · A (rows, pairs) · B (pairs, 32) in words, or C += A · B (kAccumulate,
// c_scale unused): A row r at a + r * a_row, B row t at b + t * b_step, C row r at c + r * c_row.
template <bool kAccumulate>
FASTGPT_BF16_TARGET void dot_pairs(int64_t rows, int64_t pairs, const uint32_t* a, int64_t a_row, const uint32_t* b,
                                   int64_t b_step, float* c, int64_t c_row, float c_scale) {
  int64_t r0 = 0;
  for (; r0 + kDotRows <= rows; r0 += kDotRows)
    dot_pairs_rows<kDotRows, kAccumulate>(pairs, a + r0 * a_row, a_row, b, b_step, c + r0 * c_row, c_row, c_scale);
  if (r0 < rows)
    dot_pairs_tail<kAccumulate>(rows - r0, pairs, a + r0 * a_row, a_row, b, b_step, c + r0 * c_row, c_row, c_scale);
}

// pairs (keys / 2, 32) words = the float32 rows p (keys, 32) (row stride 32) rounded to bfloat16
// (nearest even) and interleaved in pairs of rows; keys is even.
FASTGPT_BF16_TARGET inline void pack_row_pairs(const float* p, int64_t keys, uint32_t* pairs) {
  // cvtne2ps gives [bf16(even row) lanes 0..15 | bf16(odd row) lanes 0..15]; the permutation
  // takes halfword 2i from lane i of the even row and 2i + 1 from lane i of the odd one.
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t u = 0; u < keys / 2; ++u)
    for (int v = 0; v < 2; ++v) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + (2 * u + 1) * 32 + 16 * v),
                                                _mm512_loadu_ps(p + 2 * u * 32 + 16 * v));
      _mm512_storeu_si512(pairs + u * 32 + 16 * v, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
}

#else

constexpr bool kBf16DotBuilt = false;
inline bool has_bf16_dot() { return false; }
constexpr int64_t kDotLanes = 32;
// Declared for the callers' discarded `if constexpr (kDot)` branches; never defined nor called.
template <bool kAccumulate>
void dot_pairs(int64_t rows, int64_t pairs, const uint32_t* a, int64_t a_row, const uint32_t* b, int64_t b_step,
               float* c, int64_t c_row, float c_scale);
void pack_row_pairs(const float* p, int64_t keys, uint32_t* pairs);

#endif

}  // namespace
}  // namespace fastgpt
