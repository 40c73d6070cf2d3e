// Split-KV attention forward for short queries on the CPU ("flash decoding"): the forward of
// fastgpt::attention_fwd for Tq <= kDecodeMaxQueries (a decode step against a KV cache: one
// new token, or a few). Shapes and the numerics contract are the prefill forward's
// (csrc/cpu/attention.cpp, csrc/ops.cpp); only the work is laid out differently.
//
// Why a second forward: the prefill forward holds 256 queries of one head in vector lanes and
// has one task per (head, query tile); at Tq = 1 fifteen of every sixteen lanes are padding, and
// B·H tasks are all the parallelism there is. A decode step reads the whole KV cache to produce a
// handful of rows, so what counts is that every k/v byte is read once, at memory speed, by every
// thread:
//  - Rows: the queries of all the query heads that read one kv head (a GQA group) are the rows
//    of one task: row r is (query head h0 + r / Tq, query i = r % Tq). One pass over the kv
//    head's keys serves the whole group, Hq / Hkv times less k/v traffic than a pass per head.
//    More than kDecodeRows rows are cut into row blocks, each its own task.
//  - The head dim in lanes: a score q·k is a dot product along D. For L keys at a time (L the
//    vector width) the L partial-sum vectors are summed by one transposing reduction
//    (sum_each_lane), so a score costs D / L fused multiply-adds and about three shuffles, and no
//    lane is padding. P·V is the shared micro-kernel with V's rows as its vectors, in blocks as wide
//    as the registers allow (decode_pv): with one row, a narrow block would be a single chain of
//    dependent FMAs per key, latency-bound.
//  - Split over keys: a task's keys are cut into `splits` chunks (enough tasks for every thread,
//    chunks of at least kDecodeMinChunk keys), each chunk a task of its own. A chunk runs the
//    prefill's online softmax in base 2 (m, l, acc: see attention.cpp) and leaves the partial
//    (m_s, l_s, acc_s); the merge is exact:
//        M = max_s m_s,   l = sum_s 2^(m_s - M) l_s,   out = sum_s 2^(m_s - M) acc_s / l,
//        lse = (M + log2 l) · ln 2.
//    A chunk that sees no key keeps m_s = -inf and merges with weight 0; a row no chunk sees
//    gets zeros and lse -inf, as in the prefill.
//  - Key range: a task walks only keys some of its rows can see (the causal and window bounds
//    of its queries), clamped to the first and last kept key of its batch row. A static KV cache
//    attended with a key_padding_mask that hides its unfilled tail (fastgpt.nn.KVCache.attend)
//    costs the filled length, not the allocation.
// Masks follow the softcap, dropout factors (Philox keyed by the query head and element
// i · Tk + j, csrc/philox.h) multiply the probabilities after the row sums: exactly the
// prefill's order, so both forwards give the same lse and the backward serves both.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/attention_common.h"

namespace fastgpt {
namespace {

// A task holds up to kDecodeRows rows and walks kDecodeKeys keys at a time; chunks are at least
// kDecodeMinChunk keys (a merge costs a row of D per chunk: nothing next to 128 keys of k and v),
// and there are about kTasksPerThread tasks per thread so that uneven chunks still balance.
constexpr int64_t kDecodeRows = 16;
constexpr int64_t kDecodeKeys = 64;
constexpr int64_t kDecodeMinChunk = 128;
constexpr int64_t kTasksPerThread = 4;

// out[j] = sum of the lanes of acc[j], for the L = Vec::size() vectors acc[0 .. L).
template <typename T>
inline Vectorized<T> sum_each_lane(const Vectorized<T> (&acc)[Vectorized<T>::size()]) {
  constexpr int64_t L = Vectorized<T>::size();
  T sums[L];
  for (int64_t j = 0; j < L; ++j)
    sums[j] = at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; },
                                        acc[j]);
  return Vectorized<T>::loadu(sums);
}

#if defined(CPU_CAPABILITY_AVX2)
// AVX2: two rounds of horizontal adds pair up lanes (hadd(a, b) interleaves a's and b's pair sums
// per 128-bit half), leaving each vector's two half-sums in the two halves; one cross-half
// permute and add finish: 9 instructions for 8 sums.
template <>
inline Vectorized<float> sum_each_lane<float>(const Vectorized<float> (&acc)[8]) {
  const __m256 a01 = _mm256_hadd_ps(acc[0], acc[1]), a23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 a45 = _mm256_hadd_ps(acc[4], acc[5]), a67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 a0123 = _mm256_hadd_ps(a01, a23), a4567 = _mm256_hadd_ps(a45, a67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a0123, a4567, 0x20),
                       _mm256_permute2f128_ps(a0123, a4567, 0x31));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: 128-bit-lane shuffles pair acc[j] with acc[j + 8] and add their 256-bit halves; three
// rounds of emulated horizontal adds (two shuffles and an add each) then sum within 128-bit lanes,
// and two cross-lane shuffles put the 16 sums in order: 46 instructions for 16 sums.
inline __m512 hadd_lanes(__m512 a, __m512 b) {  // per 128-bit lane: [a0+a1, a2+a3, b0+b1, b2+b3]
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

template <>
inline Vectorized<float> sum_each_lane<float>(const Vectorized<float> (&acc)[16]) {
  __m512 half[8];  // half[i] = [256-bit half-sum of acc[i] | that of acc[i + 8]]
  for (int i = 0; i < 8; ++i)
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[i], acc[i + 8], 0x44),
                            _mm512_shuffle_f32x4(acc[i], acc[i + 8], 0xEE));
  // Lane l of c0 holds the quarter-sums of acc[0..3] (l = 0, 1) or acc[8..11] (l = 2, 3); c1 the same
  // for acc[4..7] and acc[12..15].
  const __m512 c0 = hadd_lanes(hadd_lanes(half[0], half[1]), hadd_lanes(half[2], half[3]));
  const __m512 c1 = hadd_lanes(hadd_lanes(half[4], half[5]), hadd_lanes(half[6], half[7]));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
  return _mm512_shuffle_f32x4(sums, sums, 0xD8);  // [0..3, 8..11, 4..7, 12..15] -> in order
}
#endif

// scores[0 .. L) = q_row · k_rows[j] for the L rows k_rows[j * Dp ...]; Dp a multiple of L.
// Four keys at a time walk the head dim (four independent FMA chains, four row pointers: no
// register spills), all L partial sums are reduced together at the end.
template <typename acc_t>
inline Vectorized<acc_t> dot_keys(const acc_t* q_row, const acc_t* k_rows, int64_t Dp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  Vec acc[L];
  for (int64_t j0 = 0; j0 < L; j0 += 4) {
    const acc_t* k0 = k_rows + j0 * Dp;
    Vec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), a3(acc_t(0));
    for (int64_t d = 0; d < Dp; d += L) {
      const Vec q = Vec::loadu(q_row + d);
      a0 = at::vec::fmadd(q, Vec::loadu(k0 + d), a0);
      a1 = at::vec::fmadd(q, Vec::loadu(k0 + Dp + d), a1);
      a2 = at::vec::fmadd(q, Vec::loadu(k0 + 2 * Dp + d), a2);
      a3 = at::vec::fmadd(q, Vec::loadu(k0 + 3 * Dp + d), a3);
    }
    acc[j0] = a0, acc[j0 + 1] = a1, acc[j0 + 2] = a2, acc[j0 + 3] = a3;
  }
  return sum_each_lane<acc_t>(acc);
}

// o (rows, Dp) += p (rows, n; row stride kDecodeKeys) · v (n, Dp): the micro-kernel over blocks of
// up to two rows and as many column vectors as divide Dp (at most 8 with AVX-512's 32 registers, 4
// otherwise), so that even one row has several independent accumulator chains per key.
template <typename acc_t, int V>
void decode_pv_columns(int64_t rows, int64_t n, const acc_t* p, const acc_t* v, int64_t Dp, acc_t* o) {
  constexpr int64_t cols = V * Vectorized<acc_t>::size();
  for (int64_t c0 = 0; c0 < Dp; c0 += cols) {
    int64_t r0 = 0;
    for (; r0 + 2 <= rows; r0 += 2)
      micro_gemm<acc_t, 2, V, true>(n, p + r0 * kDecodeKeys, kDecodeKeys, 1, v + c0, Dp, o + r0 * Dp + c0, Dp);
    if (r0 < rows) micro_gemm<acc_t, 1, V, true>(n, p + r0 * kDecodeKeys, kDecodeKeys, 1, v + c0, Dp, o + r0 * Dp + c0, Dp);
  }
}

template <typename acc_t>
void decode_pv(int64_t rows, int64_t n, const acc_t* p, const acc_t* v, int64_t Dp, acc_t* o) {
  constexpr int64_t L = Vectorized<acc_t>::size();
  constexpr int kWide = L >= 16 ? 8 : 4;
  if ((Dp / L) % kWide == 0)
    decode_pv_columns<acc_t, kWide>(rows, n, p, v, Dp, o);
  else if ((Dp / L) % 4 == 0)
    decode_pv_columns<acc_t, 4>(rows, n, p, v, Dp, o);
  else  // Dp is a whole number of micro-kernel column blocks (kMicroVecs = 2 vectors)
    decode_pv_columns<acc_t, 2>(rows, n, p, v, Dp, o);
}

// How the problem is cut into tasks: units (b, kv head, row block) x splits (key chunks).
struct DecodePlan {
  int64_t group, rows, row_blocks, units, splits;

  template <typename scalar_t>
  DecodePlan(const Problem<scalar_t>& pb, int64_t threads) {
    group = pb.H / pb.Hkv;
    rows = group * pb.Tq;
    row_blocks = (rows + kDecodeRows - 1) / kDecodeRows;
    units = pb.B * pb.Hkv * row_blocks;
    const int64_t wanted = units > 0 ? (kTasksPerThread * threads + units - 1) / units : 1;
    splits = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, pb.Tk / kDecodeMinChunk));
  }
};

template <typename acc_t>
struct DecodeScratch {
  int64_t Dp;  // D padded to whole micro-kernel column blocks
  // q_rows, o (kDecodeRows, Dp): the rows' queries (pre-scaled, base 2) and accumulators;
  // m, l (kDecodeRows): the online-softmax state; p (kDecodeRows, kDecodeKeys): a tile's scores,
  // then probabilities; k_tile, v_tile (kDecodeKeys, Dp) and k_tail (L, Dp): converted or padded
  // rows; key_bias (kDecodeKeys): 0 or -inf from the key padding mask.
  std::vector<acc_t> q_rows, o, m, l, p, z, k_tile, v_tile, k_tail, key_bias;
  DecodeScratch(int64_t D)
      : Dp(round_up(D, kGemmCols<acc_t>)), q_rows(kDecodeRows * Dp), o(kDecodeRows * Dp), m(kDecodeRows),
        l(kDecodeRows), p(kDecodeRows * kDecodeKeys), z(kDecodeKeys), k_tile(kDecodeKeys * Dp),
        v_tile(kDecodeKeys * Dp), k_tail(Vectorized<acc_t>::size() * Dp), key_bias(kDecodeKeys) {}
};

// The partial results of every task: m, l (units, splits, kDecodeRows) and the unnormalised
// accumulators o (units, splits, kDecodeRows, Dp), in acc_t.
template <typename acc_t>
struct Partials {
  acc_t* m;
  acc_t* l;
  acc_t* o;
};

// One task: rows [r0, r0 + rows) of kv head bkv = b * Hkv + kv head, keys [k_lo, k_hi) (already
// clamped to what its rows and its batch row can see). Leaves (m, l, o) in the task's partials.
template <typename scalar_t, typename acc_t>
void decode_chunk(const Problem<scalar_t>& pb, const DecodePlan& plan, int64_t bkv, int64_t r0, int64_t rows,
                  int64_t k_lo, int64_t k_hi, DecodeScratch<acc_t>& s, acc_t* m_out, acc_t* l_out, acc_t* o_out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  const int64_t D = pb.D, Dp = s.Dp, Tq = pb.Tq, b = bkv / pb.Hkv;
  const int64_t h0 = (bkv % pb.Hkv) * plan.group;  // the group's first query head
  const scalar_t* k = pb.k + bkv * pb.Tk * D;
  const scalar_t* v = pb.v + bkv * pb.Tk * D;
  const bool* keep_key = pb.keep_key ? pb.keep_key + b * pb.Tk : nullptr;
  // Row r of the task is query (r0 + r) % Tq of query head h0 + (r0 + r) / Tq.
  auto query_of = [&](int64_t r) { return (r0 + r) % Tq; };
  auto head_of = [&](int64_t r) { return b * pb.H + h0 + (r0 + r) / Tq; };

  const acc_t q_scale = static_cast<acc_t>(pb.scale * kLog2e);  // base-2 scores
  std::fill(s.q_rows.begin(), s.q_rows.end(), acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* q = pb.q + (head_of(r) * Tq + query_of(r)) * D;
    for (int64_t d = 0; d < D; ++d) s.q_rows[r * Dp + d] = static_cast<acc_t>(q[d]) * q_scale;
  }
  std::fill(s.o.begin(), s.o.end(), acc_t(0));
  std::fill(s.m.begin(), s.m.end(), -kInf<acc_t>);
  std::fill(s.l.begin(), s.l.end(), acc_t(0));

  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kDecodeKeys) {
    const int64_t n = std::min(kDecodeKeys, k_hi - k0);
    // The next tile's k and v, one cache line at a time, are requested while this one is computed:
    // ~10 % at float32 from DRAM. Tiles converted from 16-bit are bound by the conversion instead,
    // and there the extra instructions cost ~15 % (both measured on the 2-core Zen 4).
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      const int64_t next_bytes = std::min(kDecodeKeys, std::max<int64_t>(k_hi - k0 - n, 0)) * D * sizeof(scalar_t);
      for (int64_t byte = 0; byte < next_bytes; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(k + (k0 + n) * D) + byte);
        __builtin_prefetch(reinterpret_cast<const char*>(v + (k0 + n) * D) + byte);
      }
    }
    // k_tile, v_tile (n, Dp): the input rows themselves when they already are such a matrix.
    const acc_t* k_tile = rows_as<acc_t>(k + k0 * D, n, D, Dp, s.k_tile.data());
    const acc_t* v_tile = rows_as<acc_t>(v + k0 * D, n, D, Dp, s.v_tile.data());
    // The last n % L keys go through k_tail, zero-padded to L rows, so that no load leaves them.
    const int64_t full = n / L * L;
    if (full < n) {
      std::fill(s.k_tail.begin(), s.k_tail.end(), acc_t(0));
      std::copy(k_tile + full * Dp, k_tile + n * Dp, s.k_tail.begin());
    }
    bool any_hidden_key = false;
    if (keep_key != nullptr)
      for (int64_t j = 0; j < n; ++j) {
        s.key_bias[j] = keep_key[k0 + j] ? acc_t(0) : -kInf<acc_t>;
        any_hidden_key |= !keep_key[k0 + j];
      }

    const int64_t n_pad = round_up(n, L);  // the row's vectors: lanes n .. n_pad are -inf
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* p = s.p.data() + r * kDecodeKeys;  // (n_pad): base-2 scores, then probabilities
      const acc_t* q_row = s.q_rows.data() + r * Dp;
      for (int64_t j = 0; j < full; j += L) dot_keys(q_row, k_tile + j * Dp, Dp).store(p + j);
      if (full < n) dot_keys(q_row, s.k_tail.data(), Dp).store(p + full);

      // Softcap on the base-2 scores (see attention.cpp), then the masks.
      if (pb.softcap > 0.0) {
        const Vec c2(static_cast<acc_t>(pb.softcap * kLog2e));
        const Vec inv_c2(static_cast<acc_t>(1.0 / (pb.softcap * kLog2e)));
        for (int64_t j = 0; j < n_pad; j += L) (c2 * (Vec::loadu(p + j) * inv_c2).tanh()).store(p + j);
      }
      if (any_hidden_key)
        for (int64_t j = 0; j < n; ++j) p[j] += s.key_bias[j];
      const int64_t i = query_of(r);
      const int64_t lo = std::clamp<int64_t>(pb.first_key(i) - k0, 0, n);
      const int64_t hi = std::clamp<int64_t>(pb.end_key(i) - k0, lo, n);
      std::fill(p, p + lo, -kInf<acc_t>);
      std::fill(p + hi, p + n_pad, -kInf<acc_t>);

      // Online softmax of the row (the invariant: attention.cpp).
      Vec tile_max(-kInf<acc_t>);
      for (int64_t j = 0; j < n_pad; j += L) tile_max = at::vec::maximum(tile_max, Vec::loadu(p + j));
      const acc_t m_old = s.m[r];
      const acc_t m_new = std::max(
          m_old, at::vec::vec_reduce_all<acc_t>(
                     [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, tile_max));
      // A row with no visible key so far keeps m = -inf: subtracting 0 keeps its probabilities 0.
      const acc_t m_ref = m_new == -kInf<acc_t> ? acc_t(0) : m_new;
      const acc_t alpha = std::exp2(m_old - m_ref);
      Vec row_sum(acc_t(0));
      for (int64_t j = 0; j < n_pad; j += L) {
        const Vec e = exp2_vec(Vec::loadu(p + j) - Vec(m_ref));
        e.store(p + j);
        row_sum = row_sum + e;
      }
      s.l[r] = s.l[r] * alpha + at::vec::vec_reduce_all<acc_t>(
                                    [](const Vec& a, const Vec& b) { return a + b; }, row_sum);
      s.m[r] = m_new;
      if (alpha != acc_t(1))
        for (int64_t d = 0; d < Dp; d += L) (Vec::loadu(s.o.data() + r * Dp + d) * Vec(alpha)).store(s.o.data() + r * Dp + d);
      // Dropout after the row sums: l normalises the undropped probabilities.
      if (pb.dropout_p > 0.0) {
        pb.dropout_factors(head_of(r), i, k0, 1, n, s.z.data());
        for (int64_t j = 0; j < n; ++j) p[j] *= s.z[j];
      }
    }
    decode_pv(rows, n, s.p.data(), v_tile, Dp, s.o.data());  // o (rows, Dp) += p (rows, n) · v_tile (n, Dp)
  }
  std::copy(s.m.begin(), s.m.begin() + rows, m_out);
  std::copy(s.l.begin(), s.l.begin() + rows, l_out);
  std::copy(s.o.begin(), s.o.begin() + rows * Dp, o_out);
}

template <typename scalar_t, typename acc_t>
void decode_forward(const Problem<scalar_t>& pb, scalar_t* out, float* lse) {
  const int64_t threads = at::get_num_threads();
  const DecodePlan plan(pb, threads);
  if (plan.units == 0) return;  // no query rows
  const int64_t Dp = round_up(pb.D, kGemmCols<acc_t>), Tk = pb.Tk, Tq = pb.Tq;
  const int64_t slots = plan.units * plan.splits;
  std::vector<acc_t> m(slots * kDecodeRows), l(slots * kDecodeRows), o(slots * kDecodeRows * Dp);

  // The kept keys of each batch row lie in [kept_begin, kept_end) (empty: none kept).
  std::vector<int64_t> kept_begin(pb.B, 0), kept_end(pb.B, Tk);
  if (pb.keep_key != nullptr)
    for (int64_t b = 0; b < pb.B; ++b) {
      const bool* keep = pb.keep_key + b * Tk;
      int64_t first = 0, last = Tk;
      while (first < Tk && !keep[first]) ++first;
      while (last > first && !keep[last - 1]) --last;
      kept_begin[b] = first;
      kept_end[b] = last;
    }

  // Task t: unit t / splits = (b * Hkv + kv head) * row_blocks + row block, chunk t % splits.
  run_tasks<DecodeScratch<acc_t>>(
      slots, [&] { return DecodeScratch<acc_t>(pb.D); },
      [&](int64_t task, DecodeScratch<acc_t>& scratch) {
        const int64_t unit = task / plan.splits, split = task % plan.splits;
        const int64_t bkv = unit / plan.row_blocks, r0 = (unit % plan.row_blocks) * kDecodeRows;
        const int64_t rows = std::min(kDecodeRows, plan.rows - r0), b = bkv / pb.Hkv;
        // The keys any row sees: rows cover queries i_first .. i_last (all of them once rows >= Tq).
        int64_t lo = Tk, hi = 0;
        for (int64_t r = 0; r < std::min(rows, Tq); ++r) {
          const int64_t i = (r0 + r) % Tq;
          lo = std::min(lo, pb.key_begin(i));
          hi = std::max(hi, pb.key_end(i, 1));
        }
        lo = std::max(lo, kept_begin[b]);
        hi = std::min(hi, kept_end[b]);
        const int64_t chunk = round_up((std::max<int64_t>(hi - lo, 0) + plan.splits - 1) / plan.splits, kDecodeKeys);
        const int64_t k_lo = std::min(hi, lo + split * chunk), k_hi = std::min(hi, k_lo + chunk);
        const int64_t slot = task * kDecodeRows;
        decode_chunk(pb, plan, bkv, r0, rows, k_lo, k_hi, scratch, m.data() + slot, l.data() + slot,
                     o.data() + slot * Dp);
      });

  // Merge the chunks of every row by their log-sum-exp (header) and write out and lse.
  at::parallel_for(0, plan.units * kDecodeRows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(Dp);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t unit = index / kDecodeRows, r = index % kDecodeRows;
      const int64_t bkv = unit / plan.row_blocks, row_in_group = (unit % plan.row_blocks) * kDecodeRows + r;
      if (row_in_group >= plan.rows) continue;
      const int64_t b = bkv / pb.Hkv, h = (bkv % pb.Hkv) * plan.group + row_in_group / Tq, i = row_in_group % Tq;
      const int64_t first_slot = unit * plan.splits * kDecodeRows + r;  // then every kDecodeRows
      acc_t m_max = -kInf<acc_t>;
      for (int64_t c = 0; c < plan.splits; ++c) m_max = std::max(m_max, m[first_slot + c * kDecodeRows]);
      const int64_t out_row = (b * pb.H + h) * Tq + i;
      if (m_max == -kInf<acc_t>) {
        std::fill_n(out + out_row * pb.D, pb.D, scalar_t(0));
        lse[out_row] = -kInf<float>;
        continue;
      }
      std::fill(row.begin(), row.end(), acc_t(0));
      acc_t l_sum = 0;
      for (int64_t c = 0; c < plan.splits; ++c) {
        const int64_t slot = first_slot + c * kDecodeRows;
        if (m[slot] == -kInf<acc_t>) continue;  // a chunk that saw no key
        const acc_t w = std::exp2(m[slot] - m_max);
        l_sum += w * l[slot];
        for (int64_t d = 0; d < pb.D; ++d) row[d] += w * o[slot * Dp + d];
      }
      // l_sum >= 1: the chunk holding the maximum contributes 2^0 at least once.
      lse[out_row] = static_cast<float>((m_max + std::log2(l_sum)) * kLn2);
      for (int64_t d = 0; d < pb.D; ++d) out[out_row * pb.D + d] = static_cast<scalar_t>(row[d] / l_sum);
    }
  });
}

}  // namespace

void attention_decode_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, bool causal, double scale, double dropout_p,
                              int64_t seed, int64_t window, double softcap, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_decode_fwd_cpu", [&] {
    const auto pb = make_problem<scalar_t>(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap);
    decode_forward<scalar_t, acc_type<scalar_t>>(pb, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
  });
}

}  // namespace fastgpt
