// What the CPU attention kernels share (csrc/cpu/attention.cpp: the prefill forward and the
// backward; csrc/cpu/attention_decode.cpp: the split-KV forward for short queries): base-2
// exponentials, the register-blocked micro-kernel, the task runner, Philox dropout factors and
// the attention problem with its mask geometry. The algorithms are explained in those files.
//
// Everything here is in an anonymous namespace on purpose: each kernel file gets its own copy,
// compiled with that file's vector ISA flags, so no two definitions compiled for different
// instruction sets can ever be merged by the linker.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "philox.h"

namespace fastgpt {
namespace {

using at::vec::Vectorized;

constexpr int kMicroRows = 6;     // micro-kernel block: 6 rows x 2 vectors = 12 accumulators,
constexpr int kMicroVecs = 2;     // + 2 loaded vectors + 1 broadcast = 15 of AVX2's 16 registers
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// ---- 2^x ------------------------------------------------------------------------------

// 2^x for x < 127.5 (the kernels only take x <= 0, give or take rounding), flushed to exactly
// 0 below -126 (masked scores are -inf, and their probabilities must be exactly 0; this also
// keeps denormals out). x = n + f with n = round(x), |f| <= 1/2: 2^f is a degree-5 minimax
// polynomial (relative error 7.5e-8, about 2 float32 ulp once rounded) and 2^n is built
// directly in the exponent field.
inline Vectorized<float> exp2_vec(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec n = x.round();
  const Vec f = x - n;
  Vec p(1.327647245e-03f);
  p = at::vec::fmadd(p, f, Vec(9.675540961e-03f));
  p = at::vec::fmadd(p, f, Vec(5.550713092e-02f));
  p = at::vec::fmadd(p, f, Vec(2.402212024e-01f));
  p = at::vec::fmadd(p, f, Vec(6.931469440e-01f));
  p = at::vec::fmadd(p, f, Vec(1.000000119e+00f));
  // (n + 127) · 2^23 is the bit pattern of 2^n; the product is exact in float (8-bit integer).
  const Vec biased = at::vec::fmadd(n, Vec(8388608.f), Vec(127.f * 8388608.f));
  const Vec two_n = at::vec::cast<float>(at::vec::convert_to_int_of_same_size(biased));
  return Vec::blendv(p * two_n, Vec(0.f), x < Vec(-126.f));  // NaN stays NaN
}

// float64 inputs are computed in float64 throughout (gradcheck): Sleef's exp2, 1 ulp.
inline Vectorized<double> exp2_vec(const Vectorized<double>& x) { return x.exp2(); }

// ---- the micro-kernel -------------------------------------------------------------------

// C (R rows, V vectors of columns) [+]= sum over t < depth of a(r, t) · b(t, :), where
//   a(r, t) = a[r * a_row + t * a_step]  is broadcast (any layout),
//   b(t, :) = b[t * b_step + ...]         is V contiguous vectors,
//   C row r = c[r * c_row + ...].
template <typename T, int R, int V, bool kAccumulate>
inline void micro_gemm(int64_t depth, const T* a, int64_t a_row, int64_t a_step, const T* b,
                       int64_t b_step, T* c, int64_t c_row) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      acc[r][v] = kAccumulate ? Vec::loadu(c + r * c_row + v * L) : Vec(T(0));
  for (int64_t t = 0; t < depth; ++t) {
    Vec bt[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bt[v] = Vec::loadu(b + t * b_step + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec ar(a[r * a_row + t * a_step]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(ar, bt[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v].store(c + r * c_row + v * L);
}

// The last rows % kMicroRows rows of a product: micro_gemm with R = rows (1 .. kMicroRows-1).
template <typename T, bool kAccumulate, int R = kMicroRows - 1>
inline void micro_gemm_rows(int64_t rows, int64_t depth, const T* a, int64_t a_row,
                            int64_t a_step, const T* b, int64_t b_step, T* c, int64_t c_row) {
  if constexpr (R >= 1) {
    if (rows == R)
      micro_gemm<T, R, kMicroVecs, kAccumulate>(depth, a, a_row, a_step, b, b_step, c, c_row);
    else
      micro_gemm_rows<T, kAccumulate, R - 1>(rows, depth, a, a_row, a_step, b, b_step, c, c_row);
  }
}

template <typename T>
constexpr int64_t kGemmCols = kMicroVecs * Vectorized<T>::size();

// C (rows, cols) [+]= A (rows, depth) · B (depth, cols) with A, B, C addressed as in
// micro_gemm; cols must be a multiple of kGemmCols<T> (buffers are padded to it).
template <typename T, bool kAccumulate>
void gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t a_row, int64_t a_step,
          const T* b, int64_t b_step, T* c, int64_t c_row) {
  for (int64_t c0 = 0; c0 < cols; c0 += kGemmCols<T>) {
    int64_t r0 = 0;
    for (; r0 + kMicroRows <= rows; r0 += kMicroRows)
      micro_gemm<T, kMicroRows, kMicroVecs, kAccumulate>(
          depth, a + r0 * a_row, a_row, a_step, b + c0, b_step, c + r0 * c_row + c0, c_row);
    if (r0 < rows)
      micro_gemm_rows<T, kAccumulate>(rows - r0, depth, a + r0 * a_row, a_row, a_step, b + c0,
                                      b_step, c + r0 * c_row + c0, c_row);
  }
}

// ---- small helpers ----------------------------------------------------------------------

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// `rows` rows of `cols` values of a row-major scalar_t matrix as an acc_t matrix with row
// stride `ld`: the input itself when it already is one, else converted into `buffer`
// (columns cols .. ld are left as they are: zero from allocation).
template <typename acc_t, typename scalar_t>
const acc_t* rows_as(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (ld == cols) return src;
  }
  for (int64_t r = 0; r < rows; ++r) {
    int64_t c = 0;
    if constexpr (std::is_same_v<acc_t, float> && c10::is_reduced_floating_point_v<scalar_t>) {
      // bfloat16 / float16: vector conversions (a scalar cast per element would cost more than
      // the memory read in the memory-bound decode kernel).
      using Half = Vectorized<scalar_t>;
      constexpr int64_t HL = Half::size(), FL = Vectorized<float>::size();
      for (; c + HL <= cols; c += HL) {
        auto [low, high] = at::vec::convert_to_float<scalar_t>(Half::loadu(src + r * cols + c));
        low.store(buffer + r * ld + c);
        high.store(buffer + r * ld + c + FL);
      }
    }
    for (; c < cols; ++c) buffer[r * ld + c] = static_cast<acc_t>(src[r * cols + c]);
  }
  return buffer;
}

// Runs work(task, scratch) for every task in [0, n_tasks) on at::get_num_threads() workers,
// each with its own Scratch. Tasks are claimed in index order, so list the heaviest first.
template <typename Scratch, typename MakeScratch, typename Work>
void run_tasks(int64_t n_tasks, const MakeScratch& make_scratch, const Work& work) {
  if (n_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch = make_scratch();
    for (int64_t task = next++; task < n_tasks; task = next++) work(task, scratch);
  });
}

// z[e] = kept if element first + e * stride of head `head` survives dropout, else 0. Kept out
// of line so that the compiler vectorises it (Philox is lane-wise integer arithmetic).
template <typename acc_t>
__attribute__((noinline)) void dropout_run(uint32_t seed, uint32_t head, uint32_t first,
                                           uint32_t stride, int64_t n, float dropout_p, acc_t kept,
                                           acc_t* z) {
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t element = first + static_cast<uint32_t>(e) * stride;  // wraps like the mask
    z[e] = dropout_keep(seed, head, element, dropout_p) ? kept : acc_t(0);
  }
}

// The attention problem both passes share. Tensors are contiguous:
//   q (B, H, Tq, D), k, v (B, Hkv, Tk, D), keep_key bool (B, Tk) or null.
// Query head h reads kv head h / (H / Hkv) (grouped-query attention; k and v are indexed,
// never repeated). window > 0 limits query i (position p = i + Tk - Tq) to keys p - window < j
// (and, non-causal, j < p + window); softcap > 0 replaces each score s by c · tanh(s / c).
template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const bool* keep_key;
  int64_t B, H, Tq, Tk, D;
  bool causal;
  double scale;
  double dropout_p;
  uint32_t seed;
  int64_t Hkv;
  int64_t window;  // 0: none
  double softcap;  // 0: none

  // The kv head (b * Hkv + kv head) that query head bh = b * H + h reads.
  int64_t kv_head(int64_t bh) const { return (bh / H) * Hkv + (bh % H) / (H / Hkv); }
  // Whether some (query, key) pair is hidden by position (causal mask or window).
  bool position_masked() const { return causal || window > 0; }
  // Query i sees key j iff j <= i + offset() (bottom-right aligned causal mask) and, with a
  // window, j > i + offset() - window (and j < i + offset() + window when not causal).
  int64_t offset() const { return Tk - Tq; }
  // Query i sees (padding aside) the keys [first_key(i), end_key(i)), unclamped; both bounds
  // grow with i.
  int64_t first_key(int64_t i) const { return window > 0 ? i + offset() - window + 1 : 0; }
  int64_t end_key(int64_t i) const {
    return causal ? i + offset() + 1 : window > 0 ? i + offset() + window : Tk;
  }
  // Key j is seen by the queries [first_query(j), end_query(j)), unclamped; both grow with j.
  int64_t first_query(int64_t j) const {
    return causal ? j - offset() : window > 0 ? j - offset() - window + 1 : 0;
  }
  int64_t end_query(int64_t j) const { return window > 0 ? j - offset() + window : Tq; }
  // The keys any of the queries [q0, q0 + rows) sees: [key_begin, key_end).
  int64_t key_begin(int64_t q0) const { return std::clamp<int64_t>(first_key(q0), 0, Tk); }
  int64_t key_end(int64_t q0, int64_t rows) const {
    return std::clamp<int64_t>(end_key(q0 + rows - 1), 0, Tk);
  }
  // The queries that see any of the keys [k0, k0 + keys): [query_begin, query_end).
  int64_t query_begin(int64_t k0) const { return std::clamp<int64_t>(first_query(k0), 0, Tq); }
  int64_t query_end(int64_t k0, int64_t keys) const {
    return std::clamp<int64_t>(end_query(k0 + keys - 1), 0, Tq);
  }
  // Dropout factors Z (0: dropped, or 1 / (1 - p)) of n elements of head bh's (Tq, Tk) mask,
  // from element (i, j) on, `stride` apart (1: along a query's row, Tk: down a key's column).
  template <typename acc_t>
  void dropout_factors(int64_t bh, int64_t i, int64_t j, int64_t stride, int64_t n,
                       acc_t* z) const {
    const uint32_t first =
        static_cast<uint32_t>(i) * static_cast<uint32_t>(Tk) + static_cast<uint32_t>(j);
    // The mask compares float32 uniforms with float32(p), as philox.h and reference.py do.
    dropout_run(seed, static_cast<uint32_t>(bh), first, static_cast<uint32_t>(stride), n,
                static_cast<float>(dropout_p), static_cast<acc_t>(1.0 / (1.0 - dropout_p)), z);
  }
};

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, bool causal, double scale,
                               double dropout_p, int64_t seed, int64_t window, double softcap) {
  return Problem<scalar_t>{q.const_data_ptr<scalar_t>(),
                           k.const_data_ptr<scalar_t>(),
                           v.const_data_ptr<scalar_t>(),
                           mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
                           q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), causal, scale,
                           dropout_p,
                           static_cast<uint32_t>(seed),  // the low 32 bits, as reference.py
                           k.size(1), window, softcap};
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace
}  // namespace fastgpt

namespace fastgpt {

// The decode forward (fastgpt::attention_fwd for Tq <= kDecodeMaxQueries, csrc/checks.h): q (B, H, Tq, D), k, v (B, Hkv, Tk, D) contiguous, mask bool (B, Tk) contiguous
// or none, -> out (B, H, Tq, D) and lse (B, H, Tq) float32, written in place (allocated by the caller).
void attention_decode_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool causal, double scale, double dropout_p,
                              int64_t seed, int64_t window, double softcap, at::Tensor& out, at::Tensor& lse);

}  // namespace fastgpt
