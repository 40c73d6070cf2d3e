// bfloat16 dot products on the CPU (AVX-512 BF16: vdpbf16ps), for the attention forward and backward.
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
// Odd D or an odd number of keys is padded with a zero bfloat16. The backward packs its five
// products the same way, over pairs of head dims, of queries or of keys (attention.cpp,
// BackwardScratch): the reduction dimension of each product is the one in pairs.
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

// C (R rows, 32 lanes) = c_scale · Σ_t a(r, t) · b(t, :) [+ C], with words a(r, t) =
// a[r * a_row + t * a_step] (broadcast) and b(t, :) = b[t * b_step .. + 32] (two vectors).
template <int R, bool kAccumulate>
FASTGPT_BF16_TARGET inline void dot_pairs_rows(int64_t pairs, const uint32_t* a, int64_t a_row, int64_t a_step,
                                               const uint32_t* b, int64_t b_step, float* c, int64_t c_row,
                                               float c_scale) {
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
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_row + t * a_step]));
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
                                               int64_t a_step, const uint32_t* b, int64_t b_step, float* c,
                                               int64_t c_row, float c_scale) {
  if constexpr (R >= 1) {
    if (rows == R)
      dot_pairs_rows<R, kAccumulate>(pairs, a, a_row, a_step, b, b_step, c, c_row, c_scale);
    else
      dot_pairs_tail<kAccumulate, R - 1>(rows, pairs, a, a_row, a_step, b, b_step, c, c_row, c_scale);
  }
}

// C (rows, cols) = c_scale · A (rows, pairs) · B (pairs, cols) in words, or C += A · B
// (kAccumulate, c_scale unused): A(r, t) at a[r * a_row + t * a_step], B row t at b + t * b_step,
// C row r at c + r * c_row; cols is a multiple of kDotLanes.
template <bool kAccumulate>
FASTGPT_BF16_TARGET void dot_pairs(int64_t rows, int64_t cols, int64_t pairs, const uint32_t* a, int64_t a_row,
                                   int64_t a_step, const uint32_t* b, int64_t b_step, float* c, int64_t c_row,
                                   float c_scale) {
  for (int64_t c0 = 0; c0 < cols; c0 += kDotLanes) {
    int64_t r0 = 0;
    for (; r0 + kDotRows <= rows; r0 += kDotRows)
      dot_pairs_rows<kDotRows, kAccumulate>(pairs, a + r0 * a_row, a_row, a_step, b + c0, b_step,
                                            c + r0 * c_row + c0, c_row, c_scale);
    if (r0 < rows)
      dot_pairs_tail<kAccumulate>(rows - r0, pairs, a + r0 * a_row, a_row, a_step, b + c0, b_step,
                                  c + r0 * c_row + c0, c_row, c_scale);
  }
}

// pairs (ceil(rows / 2), width) words = the float32 rows p (rows, width) (row stride width, a
// multiple of 16) rounded to bfloat16 (nearest even) and interleaved in pairs of rows; an odd
// last row is paired with zeros.
FASTGPT_BF16_TARGET inline void pack_row_pairs(const float* p, int64_t rows, int64_t width, uint32_t* pairs) {
  // cvtne2ps gives [bf16(even row) lanes 0..15 | bf16(odd row) lanes 0..15]; the permutation
  // takes halfword 2i from lane i of the even row and 2i + 1 from lane i of the odd one.
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t u = 0; u < (rows + 1) / 2; ++u)
    for (int64_t e = 0; e < width; e += 16) {
      const __m512 even = _mm512_loadu_ps(p + 2 * u * width + e);
      const __m512 odd = 2 * u + 1 < rows ? _mm512_loadu_ps(p + (2 * u + 1) * width + e) : _mm512_setzero_ps();
      const __m512bh both = _mm512_cvtne2ps_pbh(odd, even);
      _mm512_storeu_si512(pairs + u * width + e, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
}

// words (n) = element d of the bfloat16 row `even` in the low half of word d, of `odd` in the
// high half (zero when odd is null): two rows packed as one row of pairs.
FASTGPT_BF16_TARGET inline void interleave_rows(const c10::BFloat16* even, const c10::BFloat16* odd, int64_t n,
                                                uint32_t* words) {
  // permutex2var picks halfword i of the result from a (index < 32) or b (index - 32).
  alignas(64) static constexpr int16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr int16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int64_t e = 0; e < n; e += 32) {
    const __mmask32 m = n - e >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - e)) - 1;
    const __m512i a = _mm512_maskz_loadu_epi16(m, even + e);
    const __m512i b = odd != nullptr ? _mm512_maskz_loadu_epi16(m, odd + e) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(words + e, static_cast<__mmask16>(m), _mm512_permutex2var_epi16(a, low, b));
    _mm512_mask_storeu_epi32(words + e + 16, static_cast<__mmask16>(m >> 16), _mm512_permutex2var_epi16(a, high, b));
  }
}

// words (n / 2) = the float32 values x (n, a multiple of 32) rounded to bfloat16 (nearest even),
// consecutive values paired as they come: element 2t in the low half of word t.
FASTGPT_BF16_TARGET inline void round_to_words(const float* x, int64_t n, uint32_t* words) {
  for (int64_t e = 0; e < n; e += 32)
    _mm512_storeu_si512(words + e / 2,
                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + e + 16), _mm512_loadu_ps(x + e)));
}

#else

constexpr bool kBf16DotBuilt = false;
inline bool has_bf16_dot() { return false; }
constexpr int64_t kDotLanes = 32;
// Declared for the callers' discarded `if constexpr (kDot)` branches; never defined nor called.
template <bool kAccumulate>
void dot_pairs(int64_t rows, int64_t cols, int64_t pairs, const uint32_t* a, int64_t a_row, int64_t a_step,
               const uint32_t* b, int64_t b_step, float* c, int64_t c_row, float c_scale);
void pack_row_pairs(const float* p, int64_t rows, int64_t width, uint32_t* pairs);
void round_to_words(const float* x, int64_t n, uint32_t* words);
void interleave_rows(const c10::BFloat16* even, const c10::BFloat16* odd, int64_t n, uint32_t* words);

#endif

}  // namespace
}  // namespace fastgpt
