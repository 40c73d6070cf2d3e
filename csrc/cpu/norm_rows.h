// What the row-wise norm kernels (layer_norm.cpp, rms_norm.cpp) share: acc_t vector loads and
// stores of a row, block loops and sums over it, and the deterministic column sums of their
// backward passes (grad_weight, grad_bias are sums over all N rows).
//
// Outputs: a fresh (N, C) output of a few MiB or more is new memory from the OS (glibc mmaps large
// blocks), and its first touch costs a page fault per 4 KiB page: for 128 MiB that is 32768
// faults, more time than the kernel's arithmetic and memory traffic together. with_huge_pages
// asks for 2 MiB transparent huge pages over the output's whole 2 MiB pages before the kernel
// writes it (what torch's allocator does under THP_MEM_ALLOC_ENABLE=1): 512 times fewer faults.
// Only a hint: where THP is off, or the memory was already touched, nothing changes.
//
// Column sums: rows are cut into chunks (chunk_rows: at least kMinRowsPerChunk rows, at most
// kMaxChunks chunks); each chunk sums its rows into its own (K, C) acc_t row of a scratch tensor,
// so threads never share an accumulator (no atomics, no locks), then a second parallel loop, over
// columns, adds the chunk partials in chunk order.
// Chunks depend on N alone, never on the thread count, so the sums are bitwise the same whatever
// at::get_num_threads() is.
//
// Everything here sits in an anonymous namespace on purpose: each kernel file compiles these
// helpers with its own floating-point contraction setting (see the pragma at its top), so every
// file must get its own copy, never one shared inline instantiation picked by the linker.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>

namespace fastgpt {
namespace {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;
template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// Chunks of rows per partial column sum. The scratch, at most kMaxChunks × K·C acc_t, is zeroed,
// accumulated into and summed once; a cap on the chunks, not a fixed chunk size, keeps it small
// for many rows (32-row chunks alone would make 8 MiB of partials of 8192 rows at C = 4096, K = 2),
// and 64 chunks still feed 64 threads.
constexpr int64_t kMinRowsPerChunk = 32;
constexpr int64_t kMaxChunks = 64;

inline int64_t chunk_rows(int64_t N) {
  return std::max(kMinRowsPerChunk, (N + kMaxChunks - 1) / kMaxChunks);
}

// t, with transparent huge pages asked for over its whole 2 MiB pages (see the top of this file).
inline at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t data = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (data + t.nbytes()) & ~(kHugePage - 1);
  // The result is ignored: a refused hint leaves ordinary pages, which are correct too.
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

// Loads the n <= AccVec::size() elements at p as acc_t; lanes past n are zero.
template <typename scalar_t>
inline AccVec<scalar_t> load(const scalar_t* p, int64_t n) {
  using Vec = AccVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return Vec::loadu(p, n);
  } else {
    if (n == Vec::size()) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, n)));
  }
}

// Stores the first n lanes of v at p, rounded to scalar_t.
template <typename scalar_t>
inline void store(scalar_t* p, const AccVec<scalar_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
}

// Outputs of at least this many bytes are written with streaming stores (store_output): an
// ordinary store first reads the line it writes (write-allocate), a streaming one does not, so
// an output of rows·C elements costs rows·C elements less read traffic, but bypasses the caches.
// Below about the size of a last-level cache, an output written the ordinary way may still be
// cached when the next op reads it; above, it is not anyway.
constexpr int64_t kStreamingMinBytes = int64_t(16) << 20;

inline bool streams(const at::Tensor& output) {
  return static_cast<int64_t>(output.nbytes()) >= kStreamingMinBytes;
}

// store(), or where `streaming` (streams(output)), a streaming store for a full block at a p
// aligned to the stored bytes, at the ISA levels that have them: for the last write of an output
// that the kernel does not read again. Streaming stores are weakly ordered: every parallel task
// ends with stream_fence().
template <typename scalar_t>
inline void store_output(scalar_t* p, const AccVec<scalar_t>& v, int64_t n, bool streaming) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using Vec = AccVec<scalar_t>;
  if (streaming && n == Vec::size() && reinterpret_cast<uintptr_t>(p) % (Vec::size() * sizeof(scalar_t)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, v);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm512_stream_pd(p, v);
    } else {  // 16 half-precision lanes: the low half of the converted vector
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_castsi512_si256(at::vec::convert_from_float<scalar_t>(v, v)));
    }
#else
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, v);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(p, v);
    } else {  // 8 half-precision lanes: the low half of the converted vector
      _mm_stream_si128(reinterpret_cast<__m128i*>(p),
                       _mm256_castsi256_si128(at::vec::convert_from_float<scalar_t>(v, v)));
    }
#endif
    return;
  }
#endif
  store(p, v, n);
}

// Orders this thread's streaming stores before whatever it does next (the end of its parallel task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Calls f(j, n) for the blocks [j, j + n) of a row of C columns: full blocks of Vec::size(),
// then the tail (n < Vec::size()). Inlined, n is a constant in the main loop.
template <typename Vec, typename F>
inline void for_each_block(int64_t C, const F& f) {
  constexpr int64_t V = Vec::size();
  int64_t j = 0;
  for (; j + V <= C; j += V) f(j, V);
  if (j < C) f(j, C - j);
}

// Σ over the blocks of a row of f(j, n) (an Acc per block, zero in lanes past n), kept in four
// independent accumulators so that consecutive adds do not wait on each other's latency. f is
// called once per block, in column order.
template <typename Vec, typename Acc, typename F>
inline Acc sum_blocks(int64_t C, const Acc& zero, const F& f) {
  constexpr int64_t V = Vec::size();
  Acc acc0 = zero, acc1 = zero, acc2 = zero, acc3 = zero;
  int64_t j = 0;
  for (; j + 4 * V <= C; j += 4 * V) {
    acc0 = acc0 + f(j, V);
    acc1 = acc1 + f(j + V, V);
    acc2 = acc2 + f(j + 2 * V, V);
    acc3 = acc3 + f(j + 3 * V, V);
  }
  for (; j + V <= C; j += V) acc0 = acc0 + f(j, V);
  if (j < C) acc0 = acc0 + f(j, C - j);
  return (acc0 + acc1) + (acc2 + acc3);
}

template <typename Vec>
inline typename Vec::value_type horizontal_sum(const Vec& v) {
  return at::vec::vec_reduce_all<typename Vec::value_type>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// Two or three row sums carried through one pass.
template <typename Vec, int K>
struct Sums {
  Vec v[K];
  Sums operator+(const Sums& o) const {
    Sums r;
    for (int k = 0; k < K; ++k) r.v[k] = v[k] + o.v[k];
    return r;
  }
  static Sums zero() {
    Sums r;
    for (int k = 0; k < K; ++k) r.v[k] = Vec(0);
    return r;
  }
};

// An upstream gradient (N, C) as rows a backward kernel reads in place: `rows` with row r at
// rows.data + r * row_stride, C contiguous elements each. Any row stride is read as it is, 0
// included: y.sum().backward() hands the backward an expanded scalar (strides 0, 0), which is
// read as one materialised row instead of an (N, C) copy of ones. Other layouts are copied.
struct GradRows {
  at::Tensor rows;
  int64_t row_stride;
};

inline GradRows grad_rows(const at::Tensor& grad) {
  if (grad.stride(1) == 1 || grad.size(1) == 1) return {grad, grad.stride(0)};
  if (grad.stride(0) == 0) return {grad.select(0, 0).contiguous(), 0};
  return {grad.contiguous(), grad.size(1)};
}

// row_fn(row) for the N rows of C columns, split across threads (about GRAIN_SIZE elements per task).
template <typename F>
inline void parallel_rows(int64_t N, int64_t C, const F& row_fn) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / C);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) row_fn(row);
    stream_fence();
  });
}

// row_fn(row, partial) for the N rows, where partial is the zeroed (K, C) acc_t scratch of the
// row's chunk (nullptr when K = 0) into which the row adds its share of the K column sums; then
// column_sums[k] (C,) = Σ over chunks, in chunk order, of partial[k] (see the top of this file).
template <typename scalar_t, typename RowFn>
void rows_with_column_sums(int64_t N, int64_t C, std::initializer_list<scalar_t*> column_sums, const RowFn& row_fn) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const int64_t K = static_cast<int64_t>(column_sums.size());
  const int64_t rows_per_chunk = chunk_rows(N);
  const int64_t num_chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partials_buffer;  // (num_chunks, K, C)
  acc* partials = nullptr;
  if (K > 0) {
    partials_buffer = with_huge_pages(
        at::empty({num_chunks, K, C}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value)));
    partials = partials_buffer.mutable_data_ptr<acc>();
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc* partial = K == 0 ? nullptr : partials + chunk * K * C;  // (K, C)
      if (K > 0) std::fill(partial, partial + K * C, acc(0));
      const int64_t row_end = std::min(N, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) row_fn(row, partial);
    }
    stream_fence();
  });
  if (K == 0) return;
  const int64_t column_grain =
      std::max<int64_t>(Vec::size(), at::internal::GRAIN_SIZE / std::max<int64_t>(num_chunks, 1));
  at::parallel_for(0, C, column_grain, [&](int64_t col_begin, int64_t col_end) {
    for_each_block<Vec>(col_end - col_begin, [&](int64_t j0, int64_t n) {
      const int64_t j = col_begin + j0;
      int64_t k = 0;
      for (scalar_t* out : column_sums) {
        Vec total(0);
        for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
          total = total + Vec::loadu(partials + (chunk * K + k) * C + j, n);
        }
        store(out + j, total, n);
        ++k;
      }
    });
  });
}

}  // namespace
}  // namespace fastgpt
