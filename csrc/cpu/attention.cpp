// Fused (flash) attention on the CPU: fastgpt::attention_fwd and fastgpt::attention_bwd
// (schemas and shapes in csrc/ops.cpp). Nothing of size Tq x Tk is ever allocated: scores
// live one small tile at a time (128 keys x 16 queries forward, 64 x 64 backward) in a
// per-thread scratch buffer.
//
// Notation: S = q kᵀ · scale (scores), P = softmax(S) over visible keys, O = (P ∘ Z) v where
// Z = keep / (1 - p) is the dropout factor (Philox mask, csrc/philox.h). Scores are kept in
// base 2 (x · log2(e)) so that every exponential is an exp2: with the exponent of 2 split into
// integer and fraction, 2^x costs one polynomial and an exponent-field add (exp2_vec below).
//
// Forward: one task = (batch b, head h, tile of kFwdQueries queries). The task walks the key
// tiles of kFwdKeys keys that any of its queries can see (causal: tiles entirely right of the
// diagonal are never touched; only tiles crossing it get a per-element mask) and keeps, per
// query i, the online-softmax state
//     m_i = max of the scores seen so far,   l_i = sum_j 2^(S_ij - m_i),
//     acc_i = sum_j 2^(S_ij - m_i) Z_ij v_j            (float32; float64 for float64 inputs)
// For a new tile: m' = max(m, tile max); acc and l are rescaled by 2^(m - m') and the tile's
// terms added with 2^(S - m'). After the last tile acc / l is the output row and
// lse = (m + log2 l) · ln 2 the log-sum-exp saved for the backward. A query that saw no
// visible key keeps m = -inf and l = 0: its output row is zeros and its lse -inf.
// Layout: the task holds its queries *in vector lanes*, in column blocks of 16 (qT is
// (D, 16) per block, the score tile sT is (keys, 16)), so the row max, the rescaling and the
// sum over keys are lane-wise vector operations with no horizontal reductions; k and v rows
// are broadcast scalars. For each key tile the task runs the whole pipeline block by block
// while the tile of k and v stays in cache, so k and v stream from memory once per 256
// queries; under the causal mask each block stops at its own last visible key.
//
// Backward (FlashAttention-2): with delta_i = rowsum(dO ∘ O) from a pre-pass,
//     P = 2^(S·log2 e - lse·log2 e)   (recomputed from the saved lse, tile by tile)
//     dV += (P ∘ Z)ᵀ dO,   dP = dO vᵀ,   dS = P ∘ (dP ∘ Z - delta) · scale,
//     dK += dSᵀ q,          dQ += dS k,
// with Z regenerated from the seed (never stored). One task = (b, h, key group g): the key
// tiles t = g, g + G, g + 2G, ... of that head (interleaved, so that under a causal mask the
// groups get equal work). For each of its key tiles the task walks every query tile that sees
// it, accumulates the tile's dK and dV in its own scratch and writes them once at the end:
// every dK/dV row has exactly one writer. A dQ row gets terms from every key tile, so each key
// group accumulates into its own buffer dq_partial[g] (B, H, Tq, D), summed after the parallel
// loop. Thus no two threads ever write the same memory (no atomics, no locks), and S and dP
// are computed once per (query tile, key tile), not twice as a separate dQ pass would need.
// G is the fewest groups that spread B·H·G tasks evenly over the threads (G = 1 once B·H is a
// multiple of the thread count: then float32/float64 accumulate straight into grad_q), so the
// extra memory is at most G · Tq · D floats per head. The task holds its keys in vector lanes
// here (kT, vT are (D, kBwdKeys)), the scores of one query in one row of the score tile.
//
// Today's models (the operator contract, shared/DESIGN.md):
//  - Grouped-query attention: q has H heads, k and v Hkv (H % Hkv == 0); query head h reads kv
//    head h / (H / Hkv) by index, k and v are never repeated. A backward task is then
//    (b, kv head, key group) and loops over the H / Hkv query heads of its kv head, so dK, dV
//    still have one writer per row and sum over the group in a fixed order (deterministic for
//    any thread count); dQ rows stay per query head. Dropout stays keyed by the query head.
//  - Sliding window W: query i (position p = i + Tk - Tq) sees p - W < j, and j < p + W when
//    not causal. Both bounds grow with i, so a block of queries sees one key interval and a key
//    tile one query interval (Problem::key_begin/key_end, query_begin/query_end): tiles wholly
//    outside the window are never visited, forward or backward, and the cost is O(T · W).
//    Only blocks crossing a boundary get the per-element mask (a prefix and a suffix of lanes).
//  - Logit softcap c: S becomes c · tanh(S / c) before any mask. In base 2 this is
//    c2 · tanh(S2 / c2) with c2 = c · log2 e, so the pre-scaled scores need no conversion; the
//    backward recomputes tanh and multiplies dS by its derivative 1 - tanh².
// None of it costs the plain path: the window's bounds reduce to the causal ones, and the
// backward's softcap is a template flag.
//
// bfloat16 on CPUs with AVX-512 BF16 (the avx512 level, checked at run time): every product
// runs as bf16 dot products (csrc/cpu/bf16_dot.h: two multiply-adds per float32 lane and
// instruction) on q, k, v, dO as they are, with float32 scores, softmax state, accumulators and
// gradients; the forward rounds P to bfloat16 for P·V, the backward P ∘ Z for dV and dS for dK
// and dQ (as FlashAttention does on GPUs). Elsewhere bfloat16 is converted to float32.
//
// Every matrix product is the same register-blocked micro-kernel (micro_gemm): a block of
// kMicroRows x (kMicroVecs vectors) of the result stays in registers while the reduction
// walks one broadcast scalar per row and kMicroVecs vector loads per step.
// Parallelism: tasks are claimed from an atomic counter by at::get_num_threads() workers,
// heaviest first (causal tiles differ in work), each worker with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/attention_common.h"
#include "cpu/bf16_dot.h"

namespace fastgpt {
namespace {


// Tiles: a forward task holds kFwdQueries queries (in lanes) and walks kFwdKeys keys at a
// time; a backward task holds kBwdKeys keys (in lanes) and walks kBwdQueries queries at a
// time. Measured on a 2-core Zen 4: 256 queries per forward task beat 64 (k, v read 4x less
// often); key tiles of 64..256 forward, and 64 rather than 128 backward, were within noise.
// At D = 64 a task's scratch is about 100 KB: it stays in L2.
constexpr int64_t kFwdQueries = 256;
constexpr int64_t kFwdKeys = 128;
constexpr int64_t kBwdQueries = 64;
constexpr int64_t kBwdKeys = 64;
static_assert(kFwdQueries % kGemmCols<float> == 0 && kBwdKeys % kGemmCols<float> == 0 &&
                  kFwdQueries % kGemmCols<double> == 0 && kBwdKeys % kGemmCols<double> == 0,
              "the tiles' lane dimensions must be whole micro-kernel column blocks");

// ---- forward ----------------------------------------------------------------------------

// A forward task's queries are processed in column blocks of kGemmCols<acc_t> queries (16
// float lanes): each block runs the whole pipeline (scores, masks, online softmax, P v) for a
// key tile while that tile of k and v stays in cache for the next block.
template <typename acc_t>
struct ForwardScratch {
  static constexpr int64_t W = kGemmCols<acc_t>;  // queries per column block
  // qT, oT (blocks, D, W): the queries (pre-scaled) and their accumulators, in lanes;
  // m, l (kFwdQueries): the online-softmax state; sT (kFwdKeys + 1, W): one block's score tile.
  std::vector<acc_t> qT, oT, m, l, sT, z, k_tile, v_tile;
  // bfloat16 dot products (bf16_dot.h), when `dot`: q_words (blocks, Dh, W) and k_words
  // (kFwdKeys + 2, Dh) in pairs of head dims, v_words (D, kVPairs) and p_words (kVPairs, W) in
  // pairs of keys (Dh = ceil(D / 2)); the extra key rows are the zero padding of odd counts.
  static constexpr int64_t kVPairs = kFwdKeys / 2 + 1;
  int64_t Dh;
  std::vector<uint32_t> q_words, k_words, v_words, p_words;
  ForwardScratch(int64_t D, bool dot)
      : qT(dot ? 0 : kFwdQueries * D), oT(kFwdQueries * D), m(kFwdQueries), l(kFwdQueries),
        sT((kFwdKeys + 1) * W), z(W), k_tile(dot ? 0 : kFwdKeys * D), v_tile(dot ? 0 : kFwdKeys * D),
        Dh((D + 1) / 2), q_words(dot ? kFwdQueries * Dh : 0), k_words(dot ? (kFwdKeys + 2) * Dh : 0),
        v_words(dot ? D * kVPairs : 0), p_words(dot ? kVPairs * W : 0) {}
};

// Head dims 2t and 2t + 1 of a bfloat16 row of D as one word (zero past D).
inline uint32_t dim_pair(const c10::BFloat16* row, int64_t t, int64_t D) {
  return bf16_word(row[2 * t], 2 * t + 1 < D ? row[2 * t + 1] : c10::BFloat16(0.f));
}

// Rows x (rows, D) of bfloat16 as words of head-dim pairs (rows, Dh): a row already is its
// words, but for the zero that pads an odd D.
inline void pack_dim_pairs(const c10::BFloat16* x, int64_t rows, int64_t D, int64_t Dh, uint32_t* words) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(words + i * Dh, x + i * D, D * sizeof(c10::BFloat16));
    if (D % 2 == 1) words[i * Dh + Dh - 1] &= 0xffffu;
  }
}

// One forward task: queries [q0, q0 + rows) of head bh. out (rows, D) and lse (rows) point at
// the task's rows of the outputs.
// kDot: bfloat16 inputs through bf16 dot products (bf16_dot.h): the same pipeline, with the two
// products on pairs of words, q unscaled (the scale is applied to the float32 scores) and every
// block's key range widened to whole key pairs (the widening keys are masked like hidden ones).
template <typename scalar_t, typename acc_t, bool kDot>
void forward_tile(const Problem<scalar_t>& pb, int64_t bh, int64_t q0, int64_t rows,
                  ForwardScratch<acc_t>& s, scalar_t* out, float* lse) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size(), W = ForwardScratch<acc_t>::W;
  static_assert(!kDot || W == kDotLanes, "a query block is one bf16 dot block");
  const int64_t D = pb.D, Tk = pb.Tk, b = bh / pb.H, blocks = (rows + W - 1) / W, Dh = s.Dh;
  const scalar_t* q = pb.q + (bh * pb.Tq + q0) * D;
  const scalar_t* k = pb.k + pb.kv_head(bh) * Tk * D;  // the kv head the query head reads
  const scalar_t* v = pb.v + pb.kv_head(bh) * Tk * D;
  const bool* keep_key = pb.keep_key ? pb.keep_key + b * Tk : nullptr;

  // Query q0 + i is lane i % W of block i / W; lanes past `rows` stay 0 (and unused).
  const acc_t q_scale = static_cast<acc_t>(pb.scale * kLog2e);  // base-2 scores
  if constexpr (kDot) {
    std::fill(s.q_words.begin(), s.q_words.end(), 0u);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t t = 0; t < Dh; ++t) s.q_words[((i / W) * Dh + t) * W + i % W] = dim_pair(q + i * D, t, D);
  } else {
    std::fill(s.qT.begin(), s.qT.end(), acc_t(0));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t d = 0; d < D; ++d)
        s.qT[((i / W) * D + d) * W + i % W] = static_cast<acc_t>(q[i * D + d]) * q_scale;
  }
  std::fill(s.oT.begin(), s.oT.end(), acc_t(0));
  std::fill(s.m.begin(), s.m.end(), -kInf<acc_t>);
  std::fill(s.l.begin(), s.l.end(), acc_t(0));

  // Only the keys some query of the task sees are walked: with a window, O(rows + window).
  const int64_t key_end = pb.key_end(q0, rows);
  constexpr int64_t kVPairs = ForwardScratch<acc_t>::kVPairs;
  for (int64_t k0 = pb.key_begin(q0); k0 < key_end; k0 += kFwdKeys) {
    const int64_t tile_keys = std::min(kFwdKeys, key_end - k0);
    // k_tile, v_tile (tile_keys, D); or k_words (tile_keys + pad, Dh), v_words (D, kVPairs).
    const acc_t* k_tile = nullptr;
    const acc_t* v_tile = nullptr;
    if constexpr (kDot) {
      std::fill(s.k_words.begin() + tile_keys * Dh, s.k_words.end(), 0u);
      pack_dim_pairs(k + k0 * D, tile_keys, D, Dh, s.k_words.data());
      for (int64_t u = 0; u < (tile_keys + 1) / 2; ++u) {
        const scalar_t* even = v + (k0 + 2 * u) * D;
        const bool has_odd = 2 * u + 1 < tile_keys;
        for (int64_t d = 0; d < D; ++d)
          s.v_words[d * kVPairs + u] = bf16_word(even[d], has_odd ? even[D + d] : scalar_t(0.f));
      }
    } else {
      k_tile = rows_as<acc_t>(k + k0 * D, tile_keys, D, D, s.k_tile.data());
      v_tile = rows_as<acc_t>(v + k0 * D, tile_keys, D, D, s.v_tile.data());
    }

    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t first = q0 + block * W;  // the block's first query
      const int64_t block_rows = std::min(W, q0 + rows - first);
      // Keys [kb, kb + keys) of the tile are visible to some query of the block: the causal
      // mask and the window hide the rest from all of them, so they are not even computed.
      const int64_t kb = std::max(k0, pb.key_begin(first));
      const int64_t keys = std::min(k0 + tile_keys, pb.key_end(first, block_rows)) - kb;
      if (keys <= 0) continue;
      // The score tile holds the keys [kb - lead, kb - lead + span): with bf16 dot products
      // the whole key pairs around [kb, kb + keys), else exactly those keys.
      const int64_t lead = kDot ? (kb - k0) % 2 : 0;
      const int64_t span = kDot ? round_up(lead + keys, 2) : keys;
      acc_t* oT = s.oT.data() + block * D * W;  // (D, W)
      acc_t* m = s.m.data() + block * W;
      acc_t* l = s.l.data() + block * W;
      acc_t* tile = s.sT.data();       // (span, W): base-2 scores, then probabilities
      acc_t* sT = tile + lead * W;     // (keys, W): the rows of keys kb .. kb + keys

      // tile (span, W) = k · qT, scaled to base 2
      if constexpr (kDot)
        dot_pairs<false>(span, W, Dh, s.k_words.data() + (kb - lead - k0) * Dh, Dh, 1,
                         s.q_words.data() + block * Dh * W, W, tile, W, q_scale);
      else
        gemm<acc_t, false>(keys, W, D, k_tile + (kb - k0) * D, D, 1, s.qT.data() + block * D * W, W, sT, W);

      // Softcap on the base-2 scores: with c2 = c · log2 e, c · tanh(s / c) · log2 e equals
      // c2 · tanh(s2 / c2) for s2 = s · log2 e. Before the masks, which then stay -inf.
      if (pb.softcap > 0.0) {
        const Vec c2(static_cast<acc_t>(pb.softcap * kLog2e));
        const Vec inv_c2(static_cast<acc_t>(1.0 / (pb.softcap * kLog2e)));
        for (int64_t e = 0; e < keys * W; e += L)
          (c2 * (Vec::loadu(sT + e) * inv_c2).tanh()).store(sT + e);
      }
      // The widening keys of a pair are seen by no query of the block.
      std::fill(tile, sT, -kInf<acc_t>);
      std::fill(sT + keys * W, tile + span * W, -kInf<acc_t>);

      // Masks, applied after scaling (a negative scale must not turn -inf into +inf).
      if (keep_key != nullptr)
        for (int64_t j = 0; j < keys; ++j)
          if (!keep_key[kb + j]) std::fill_n(sT + j * W, W, -kInf<acc_t>);
      // Key kb + j is seen by the lanes [first_query - first, end_query - first): the causal
      // mask hides a prefix of lanes, the window a suffix (and, non-causal, a prefix). Only
      // blocks crossing a boundary have any such lane: the first query's last key, or the last
      // query's first key, falls inside the block's keys.
      if (pb.position_masked() && (kb + keys > pb.end_key(first) ||
                                   kb < pb.first_key(first + block_rows - 1)))
        for (int64_t j = 0; j < keys; ++j) {
          const int64_t lo = std::clamp<int64_t>(pb.first_query(kb + j) - first, 0, W);
          const int64_t hi = std::clamp<int64_t>(pb.end_query(kb + j) - first, lo, W);
          std::fill(sT + j * W, sT + j * W + lo, -kInf<acc_t>);
          std::fill(sT + j * W + hi, sT + (j + 1) * W, -kInf<acc_t>);
        }

      // Online softmax, L queries at a time (see the header for the invariant).
      for (int64_t c = 0; c < W; c += L) {
        Vec tile_max(-kInf<acc_t>);
        for (int64_t j = 0; j < span; ++j)
          tile_max = at::vec::maximum(tile_max, Vec::loadu(tile + j * W + c));
        const Vec m_old = Vec::loadu(m + c);
        const Vec m_new = at::vec::maximum(m_old, tile_max);
        // A query with no visible key so far keeps m = -inf; subtracting 0 instead keeps its
        // probabilities exactly 0 rather than 2^(-inf - -inf) = NaN.
        const Vec m_ref = Vec::blendv(m_new, Vec(acc_t(0)), m_new == Vec(-kInf<acc_t>));
        const Vec alpha = exp2_vec(m_old - m_ref);
        Vec row_sum(acc_t(0));
        for (int64_t j = 0; j < span; ++j) {
          const Vec p = exp2_vec(Vec::loadu(tile + j * W + c) - m_ref);
          p.store(tile + j * W + c);
          row_sum = row_sum + p;
        }
        at::vec::fmadd(Vec::loadu(l + c), alpha, row_sum).store(l + c);
        m_new.store(m + c);
        if ((alpha - Vec(acc_t(1))).zero_mask() != (1 << L) - 1)  // some query's maximum moved
          for (int64_t d = 0; d < D; ++d)
            (Vec::loadu(oT + d * W + c) * alpha).store(oT + d * W + c);
      }

      // Dropout after the row sums: l normalises the undropped probabilities.
      if (pb.dropout_p > 0.0)
        for (int64_t j = 0; j < keys; ++j) {
          pb.dropout_factors(bh, first, kb + j, Tk, W, s.z.data());  // key kb + j, W queries
          for (int64_t c = 0; c < W; c += L)
            (Vec::loadu(sT + j * W + c) * Vec::loadu(s.z.data() + c)).store(sT + j * W + c);
        }

      // oT (D, W) += vᵀ · P: row d of the product broadcasts v[j, d] (a pair of keys with kDot).
      if constexpr (kDot) {
        pack_row_pairs(tile, span, W, s.p_words.data());
        dot_pairs<true>(D, W, span / 2, s.v_words.data() + (kb - lead - k0) / 2, kVPairs, 1, s.p_words.data(), W,
                        oT, W, 1.f);
      } else {
        gemm<acc_t, true>(D, W, keys, v_tile + (kb - k0) * D, 1, D, sT, W, oT, W);
      }
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    const acc_t l = s.l[i];
    // l >= 1 once a query has seen a visible key (its maximum contributes 2^0).
    const acc_t inv_l = l > 0 ? acc_t(1) / l : acc_t(0);
    lse[i] = l > 0 ? static_cast<float>((s.m[i] + std::log2(l)) * kLn2) : -kInf<float>;
    const acc_t* oT = s.oT.data() + (i / W) * D * W + i % W;
    for (int64_t d = 0; d < D; ++d) out[i * D + d] = static_cast<scalar_t>(oT[d * W] * inv_l);
  }
}

template <typename scalar_t, typename acc_t, bool kDot>
void forward(const Problem<scalar_t>& pb, scalar_t* out, float* lse) {
  const int64_t BH = pb.B * pb.H, query_tiles = (pb.Tq + kFwdQueries - 1) / kFwdQueries;
  // Task t: head t % BH, query tile (last first: under a causal mask later tiles see more keys).
  run_tasks<ForwardScratch<acc_t>>(
      BH * query_tiles, [&] { return ForwardScratch<acc_t>(pb.D, kDot); },
      [&](int64_t task, ForwardScratch<acc_t>& scratch) {
        const int64_t bh = task % BH, q0 = (query_tiles - 1 - task / BH) * kFwdQueries;
        const int64_t rows = std::min(kFwdQueries, pb.Tq - q0);
        forward_tile<scalar_t, acc_t, kDot>(pb, bh, q0, rows, scratch, out + (bh * pb.Tq + q0) * pb.D,
                     lse + bh * pb.Tq + q0);
      });
}

// ---- backward ---------------------------------------------------------------------------

// kDot (bfloat16 through bf16 dot products, bf16_dot.h): every product's reduction runs over
// pairs packed in words: head dims for S = q kᵀ and dP = dO vᵀ (q_words, do_words (rows, Dh);
// kT_words, vT_words (Dh, kBwdKeys)), queries for dVᵀ += dOᵀ (P ∘ Z) and dKᵀ += qᵀ dS (q_pairs,
// do_pairs (rows / 2, D); pz_pairs, ds_pairs (rows / 2, kBwdKeys): P ∘ Z and dS rounded to
// bfloat16), keys for dQ = dS k (ds_words (rows, kBwdKeys / 2); k_pairs (kBwdKeys / 2, Dp)).
// dK and dV are accumulated transposed, (D, kBwdKeys) with the keys in lanes like S.
template <typename acc_t>
struct BackwardScratch {
  int64_t Dp;  // D padded to whole micro-kernel (kDot: dot block) column blocks
  int64_t Dh;  // words of head-dim pairs, ceil(D / 2)
  std::vector<acc_t> kT, vT, k_rows, key_bias, dk, dv, q_rows, do_rows, lse2, p, z, pz, ds, dq,
      cap;
  std::vector<uint32_t> kT_words, vT_words, k_pairs, q_words, do_words, q_pairs, do_pairs, pz_pairs, ds_pairs,
      ds_words;
  BackwardScratch(int64_t D, bool dot)
      : Dp(round_up(D, dot ? kDotLanes : kGemmCols<acc_t>)), Dh((D + 1) / 2), kT(dot ? 0 : D * kBwdKeys),
        vT(dot ? 0 : D * kBwdKeys), k_rows(dot ? 0 : kBwdKeys * Dp), key_bias(kBwdKeys),
        dk(dot ? D * kBwdKeys : kBwdKeys * Dp), dv(dot ? D * kBwdKeys : kBwdKeys * Dp),
        q_rows(dot ? 0 : kBwdQueries * Dp), do_rows(dot ? 0 : kBwdQueries * Dp), lse2(kBwdQueries),
        p(kBwdQueries * kBwdKeys), z(kBwdQueries * kBwdKeys), pz(kBwdQueries * kBwdKeys),
        ds(kBwdQueries * kBwdKeys), dq(kBwdQueries * Dp), cap(kBwdQueries * kBwdKeys),
        kT_words(dot ? Dh * kBwdKeys : 0), vT_words(dot ? Dh * kBwdKeys : 0), k_pairs(dot ? kBwdKeys / 2 * Dp : 0),
        q_words(dot ? kBwdQueries * Dh : 0), do_words(dot ? kBwdQueries * Dh : 0),
        q_pairs(dot ? kBwdQueries / 2 * D : 0), do_pairs(dot ? kBwdQueries / 2 * D : 0),
        pz_pairs(dot ? kBwdQueries / 2 * kBwdKeys : 0), ds_pairs(dot ? kBwdQueries / 2 * kBwdKeys : 0),
        ds_words(dot ? kBwdQueries * kBwdKeys / 2 : 0) {}
};

// Rows x (rows, D) of bfloat16 as words of row pairs (ceil(rows / 2), D), row stride ld: word
// (u, d) holds x[2u, d] and x[2u + 1, d] (zero past the last row).
inline void pack_rows_in_pairs(const c10::BFloat16* x, int64_t rows, int64_t D, int64_t ld, uint32_t* words) {
  for (int64_t u = 0; u < (rows + 1) / 2; ++u)
    interleave_rows(x + 2 * u * D, 2 * u + 1 < rows ? x + (2 * u + 1) * D : nullptr, D, words + u * ld);
}

// Tensors of the backward beyond the problem (contiguous):
//   grad_out, out (B, H, Tq, D); lse (B, H, Tq) float32; delta (B, H, Tq) = rowsum(dO ∘ O);
//   dq_partial (G, B, H, Tq, D) acc_t; grad_k, grad_v (B, Hkv, Tk, D).
template <typename scalar_t, typename acc_t>
struct Gradients {
  const scalar_t* grad_out;
  const float* lse;
  const acc_t* delta;
  acc_t* dq_partial;
  scalar_t* grad_k;
  scalar_t* grad_v;
};

// Keys [k0, k0 + keys) of kv head bkv = b * Hkv + kv head: their dK, dV rows, summed over the
// query heads of the group that read this kv head (in head order, inside this one task: the
// sum is deterministic), and their dS k terms added to dq (B, H, Tq, D), one key group's buffer.
// kSoftcap is a template flag so that the path without a cap has no trace of it; kDot: the
// products through bf16 dot products (see BackwardScratch).
template <bool kSoftcap, bool kDot, typename scalar_t, typename acc_t>
void backward_key_tile(const Problem<scalar_t>& pb, const Gradients<scalar_t, acc_t>& g,
                       int64_t bkv, int64_t k0, int64_t keys, BackwardScratch<acc_t>& s,
                       acc_t* dq_heads) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  const int64_t D = pb.D, Dp = s.Dp, Tq = pb.Tq, Tk = pb.Tk, b = bkv / pb.Hkv;
  const int64_t group = pb.H / pb.Hkv, h0 = (bkv % pb.Hkv) * group;  // its query heads
  const scalar_t* k = pb.k + (bkv * Tk + k0) * D;
  const scalar_t* v = pb.v + (bkv * Tk + k0) * D;

  // kT, vT (D, kBwdKeys): the keys in lanes; lanes >= keys are 0 and masked by key_bias
  // (kDot: kT_words, vT_words (Dh, kBwdKeys) and k_pairs (kBwdKeys / 2, Dp), zero-padded).
  const acc_t* k_rows = nullptr;
  if constexpr (kDot) {
    const int64_t Dh = s.Dh;
    std::fill(s.kT_words.begin(), s.kT_words.end(), 0u);
    std::fill(s.vT_words.begin(), s.vT_words.end(), 0u);
    std::fill(s.k_pairs.begin(), s.k_pairs.end(), 0u);
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t t = 0; t < Dh; ++t) {
        s.kT_words[t * kBwdKeys + j] = dim_pair(k + j * D, t, D);
        s.vT_words[t * kBwdKeys + j] = dim_pair(v + j * D, t, D);
      }
    pack_rows_in_pairs(k, keys, D, Dp, s.k_pairs.data());
  } else {
    std::fill(s.kT.begin(), s.kT.end(), acc_t(0));
    std::fill(s.vT.begin(), s.vT.end(), acc_t(0));
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t d = 0; d < D; ++d) {
        s.kT[d * kBwdKeys + j] = static_cast<acc_t>(k[j * D + d]);
        s.vT[d * kBwdKeys + j] = static_cast<acc_t>(v[j * D + d]);
      }
    k_rows = rows_as<acc_t>(k, keys, D, Dp, s.k_rows.data());  // (keys, Dp)
  }
  // key_bias (kBwdKeys): 0 for a visible key, -inf for a padded one or a lane past the tile.
  bool any_hidden_key = keys < kBwdKeys;
  for (int64_t j = 0; j < kBwdKeys; ++j) {
    const bool visible = j < keys && (pb.keep_key == nullptr || pb.keep_key[b * Tk + k0 + j]);
    s.key_bias[j] = visible ? acc_t(0) : -kInf<acc_t>;
    any_hidden_key |= !visible;
  }
  std::fill(s.dk.begin(), s.dk.end(), acc_t(0));  // (kBwdKeys, Dp); kDot: (D, kBwdKeys)
  std::fill(s.dv.begin(), s.dv.end(), acc_t(0));

  const acc_t score_scale = static_cast<acc_t>(pb.scale * kLog2e);
  const acc_t grad_scale = static_cast<acc_t>(pb.scale);
  const bool dropout = pb.dropout_p > 0.0;
  // Softcap in base 2 (see forward_tile): S2 = c2 · tanh(s2 / c2) with c2 = c · log2 e.
  const acc_t c2 = static_cast<acc_t>(pb.softcap * kLog2e);
  const acc_t inv_c2 = kSoftcap ? static_cast<acc_t>(1.0 / (pb.softcap * kLog2e)) : acc_t(0);
  // Only the query tiles that see some key of the tile: with a window, O(keys + window).
  const int64_t query_begin = pb.query_begin(k0), query_end = pb.query_end(k0, keys);
  for (int64_t bh = b * pb.H + h0; bh < b * pb.H + h0 + group; ++bh) {
    const scalar_t* q = pb.q + bh * Tq * D;
    const scalar_t* grad_out = g.grad_out + bh * Tq * D;
    acc_t* dq = dq_heads + bh * Tq * D;  // (Tq, D)
    for (int64_t q0 = query_begin; q0 < query_end; q0 += kBwdQueries) {
      const int64_t rows = std::min(kBwdQueries, query_end - q0);
      // q_rows, do_rows (rows, Dp); kDot: their words in pairs of head dims and of rows.
      const acc_t* q_rows = nullptr;
      const acc_t* do_rows = nullptr;
      if constexpr (kDot) {
        pack_dim_pairs(q + q0 * D, rows, D, s.Dh, s.q_words.data());
        pack_dim_pairs(grad_out + q0 * D, rows, D, s.Dh, s.do_words.data());
        pack_rows_in_pairs(q + q0 * D, rows, D, D, s.q_pairs.data());
        pack_rows_in_pairs(grad_out + q0 * D, rows, D, D, s.do_pairs.data());
      } else {
        q_rows = rows_as<acc_t>(q + q0 * D, rows, D, Dp, s.q_rows.data());
        do_rows = rows_as<acc_t>(grad_out + q0 * D, rows, D, Dp, s.do_rows.data());
      }
      const acc_t* delta = g.delta + bh * Tq + q0;
      for (int64_t i = 0; i < rows; ++i) {
        // A query that sees no key (lse = -inf) has P = 0: 2^(S - +inf) = 0.
        const float lse = g.lse[bh * Tq + q0 + i];
        s.lse2[i] = lse == -kInf<float> ? kInf<acc_t> : static_cast<acc_t>(lse * kLog2e);
      }

      // p (rows, kBwdKeys) = q_rows · kT, then P = 2^(S · scale · log2 e - lse · log2 e).
      acc_t* p = s.p.data();
      if constexpr (kDot)
        dot_pairs<false>(rows, kBwdKeys, s.Dh, s.q_words.data(), s.Dh, 1, s.kT_words.data(), kBwdKeys, p, kBwdKeys,
                         1.f);
      else
        gemm<acc_t, false>(rows, kBwdKeys, D, q_rows, Dp, 1, s.kT.data(), kBwdKeys, p, kBwdKeys);
      // Whether some query of the tile is hidden from some key by position (see forward_tile).
      const bool crosses_boundary =
          pb.position_masked() &&
          (k0 + keys > pb.end_key(q0) || k0 < pb.first_key(q0 + rows - 1));
      for (int64_t i = 0; i < rows; ++i) {
        acc_t* p_row = p + i * kBwdKeys;
        const Vec bias(-s.lse2[i]);
        if constexpr (kSoftcap) {
          // cap = 1 - tanh², the derivative of the cap, kept for dS.
          acc_t* cap_row = s.cap.data() + i * kBwdKeys;
          for (int64_t j = 0; j < kBwdKeys; j += L) {
            const Vec t = (Vec::loadu(p_row + j) * Vec(score_scale * inv_c2)).tanh();
            (Vec(acc_t(1)) - t * t).store(cap_row + j);
            Vec x = at::vec::fmadd(t, Vec(c2), bias);
            if (any_hidden_key) x = x + Vec::loadu(s.key_bias.data() + j);
            x.store(p_row + j);
          }
        } else {
          for (int64_t j = 0; j < kBwdKeys; j += L) {
            Vec x = at::vec::fmadd(Vec::loadu(p_row + j), Vec(score_scale), bias);
            if (any_hidden_key) x = x + Vec::loadu(s.key_bias.data() + j);
            x.store(p_row + j);
          }
        }
        // Query q0 + i sees the lanes [first_key - k0, end_key - k0): the causal mask hides a
        // suffix of lanes, the window a prefix (and, non-causal, a suffix).
        if (crosses_boundary) {
          const int64_t lo = std::clamp<int64_t>(pb.first_key(q0 + i) - k0, 0, kBwdKeys);
          const int64_t hi = std::clamp<int64_t>(pb.end_key(q0 + i) - k0, lo, kBwdKeys);
          std::fill(p_row, p_row + lo, -kInf<acc_t>);
          std::fill(p_row + hi, p_row + kBwdKeys, -kInf<acc_t>);
        }
        for (int64_t j = 0; j < kBwdKeys; j += L) exp2_vec(Vec::loadu(p_row + j)).store(p_row + j);
      }

      // With dropout, dV sees P ∘ Z and dS needs dP ∘ Z (Z of the query head bh).
      const acc_t* pz = p;
      if (dropout) {
        for (int64_t i = 0; i < rows; ++i) {
          acc_t* z = s.z.data() + i * kBwdKeys;
          pb.dropout_factors(bh, q0 + i, k0, 1, kBwdKeys, z);  // row of query q0 + i
          for (int64_t j = 0; j < kBwdKeys; j += L)
            (Vec::loadu(p + i * kBwdKeys + j) * Vec::loadu(z + j))
                .store(s.pz.data() + i * kBwdKeys + j);
        }
        pz = s.pz.data();
      }

      // dv (keys, Dp) += pzᵀ · do_rows: row j of the product broadcasts pz[i, j]
      // (kDot: dvᵀ (D, kBwdKeys) += do_rowsᵀ · pz, over pairs of queries).
      const int64_t query_pairs = (rows + 1) / 2;
      if constexpr (kDot) {
        pack_row_pairs(pz, rows, kBwdKeys, s.pz_pairs.data());
        dot_pairs<true>(D, kBwdKeys, query_pairs, s.do_pairs.data(), 1, D, s.pz_pairs.data(), kBwdKeys, s.dv.data(),
                        kBwdKeys, 1.f);
      } else {
        gemm<acc_t, true>(keys, Dp, rows, pz, 1, kBwdKeys, do_rows, Dp, s.dv.data(), Dp);
      }
      // ds (rows, kBwdKeys) = do_rows · vT, then dS = P ∘ (dP ∘ Z - delta) · scale
      // (∘ (1 - tanh²) with a softcap: the chain rule through c · tanh(s / c)).
      acc_t* ds = s.ds.data();
      if constexpr (kDot)
        dot_pairs<false>(rows, kBwdKeys, s.Dh, s.do_words.data(), s.Dh, 1, s.vT_words.data(), kBwdKeys, ds,
                         kBwdKeys, 1.f);
      else
        gemm<acc_t, false>(rows, kBwdKeys, D, do_rows, Dp, 1, s.vT.data(), kBwdKeys, ds, kBwdKeys);
      for (int64_t i = 0; i < rows; ++i) {
        acc_t* ds_row = ds + i * kBwdKeys;
        const Vec d_i(delta[i]);
        for (int64_t j = 0; j < kBwdKeys; j += L) {
          Vec dp = Vec::loadu(ds_row + j);
          if (dropout) dp = dp * Vec::loadu(s.z.data() + i * kBwdKeys + j);
          (Vec::loadu(p + i * kBwdKeys + j) * (dp - d_i) * Vec(grad_scale)).store(ds_row + j);
        }
        if constexpr (kSoftcap)
          for (int64_t j = 0; j < kBwdKeys; j += L)
            (Vec::loadu(ds_row + j) * Vec::loadu(s.cap.data() + i * kBwdKeys + j))
                .store(ds_row + j);
      }
      // dk (keys, Dp) += dsᵀ · q_rows;  dq rows (rows, Dp) = ds · k_rows
      // (kDot: dkᵀ (D, kBwdKeys) += q_rowsᵀ · ds over pairs of queries, dq over pairs of keys).
      if constexpr (kDot) {
        pack_row_pairs(ds, rows, kBwdKeys, s.ds_pairs.data());
        dot_pairs<true>(D, kBwdKeys, query_pairs, s.q_pairs.data(), 1, D, s.ds_pairs.data(), kBwdKeys, s.dk.data(),
                        kBwdKeys, 1.f);
        for (int64_t i = 0; i < rows; ++i)
          round_to_words(ds + i * kBwdKeys, kBwdKeys, s.ds_words.data() + i * (kBwdKeys / 2));
        dot_pairs<false>(rows, Dp, (keys + 1) / 2, s.ds_words.data(), kBwdKeys / 2, 1, s.k_pairs.data(), Dp,
                         s.dq.data(), Dp, 1.f);
      } else {
        gemm<acc_t, true>(keys, Dp, rows, ds, 1, kBwdKeys, q_rows, Dp, s.dk.data(), Dp);
        gemm<acc_t, false>(rows, Dp, keys, ds, kBwdKeys, 1, k_rows, Dp, s.dq.data(), Dp);
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) dq[(q0 + i) * D + d] += s.dq[i * Dp + d];
    }
  }

  scalar_t* grad_k = g.grad_k + (bkv * Tk + k0) * D;
  scalar_t* grad_v = g.grad_v + (bkv * Tk + k0) * D;
  // dk, dv: (key, dim) at j * Dp + d, or (dim, key) at d * kBwdKeys + j with kDot.
  const int64_t key_step = kDot ? 1 : Dp, dim_step = kDot ? kBwdKeys : 1;
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t d = 0; d < D; ++d) {
      grad_k[j * D + d] = static_cast<scalar_t>(s.dk[j * key_step + d * dim_step]);
      grad_v[j * D + d] = static_cast<scalar_t>(s.dv[j * key_step + d * dim_step]);
    }
}

// Key groups per kv head: the fewest that split the B·Hkv·G (equal-sized) tasks evenly over the
// threads, so that dQ needs as few partial buffers as possible; 1 when B·Hkv alone gives every
// thread at least 8 tasks.
int64_t key_groups(int64_t BHkv, int64_t key_tiles) {
  const int64_t threads = at::get_num_threads();
  if (BHkv >= 8 * threads) return 1;
  return std::clamp<int64_t>(threads / std::gcd(BHkv, threads), 1, std::max<int64_t>(key_tiles, 1));
}

template <typename scalar_t, typename acc_t, bool kDot>
void backward(const Problem<scalar_t>& pb, const Gradients<scalar_t, acc_t>& g, int64_t groups) {
  const int64_t BH = pb.B * pb.H, BHkv = pb.B * pb.Hkv;
  const int64_t key_tiles = (pb.Tk + kBwdKeys - 1) / kBwdKeys;
  // Task t: kv head t % BHkv, key group t / BHkv (group 0 holds the earliest keys: the most
  // work). The task owns its keys' dK, dV rows for all the query heads of the kv head.
  run_tasks<BackwardScratch<acc_t>>(
      BHkv * groups, [&] { return BackwardScratch<acc_t>(pb.D, kDot); },
      [&](int64_t task, BackwardScratch<acc_t>& scratch) {
        const int64_t bkv = task % BHkv, group = task / BHkv;
        acc_t* dq = g.dq_partial + group * BH * pb.Tq * pb.D;  // (B, H, Tq, D)
        for (int64_t tile = group; tile < key_tiles; tile += groups) {
          const int64_t k0 = tile * kBwdKeys;
          const int64_t keys = std::min(kBwdKeys, pb.Tk - k0);
          if (pb.softcap > 0.0)
            backward_key_tile<true, kDot>(pb, g, bkv, k0, keys, scratch, dq);
          else
            backward_key_tile<false, kDot>(pb, g, bkv, k0, keys, scratch, dq);
        }
      });
}

// ---- the operators ----------------------------------------------------------------------

// The CPU kernels' own limit (fastgpt/backends.py declares the cpu backend's head dims to match;
// tests/test_attention.py checks the two agree). The other argument checks: csrc/checks.h.
constexpr int64_t kMaxHeadDim = 256;

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& key_padding_mask, double dropout_p, int64_t window,
                  double softcap) {
  check_attention_inputs(op, q, k, v, key_padding_mask, dropout_p, window, softcap);
  check_attention_features(op, "CPU", /*gqa=*/true, /*window=*/true, /*softcap=*/true, q, k, window, softcap);
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim must be 1..", kMaxHeadDim,
              " (the CPU kernels), got ", q.size(3));
}


// q (B, H, Tq, D), k, v (B, Hkv, Tk, D), key_padding_mask bool (B, Tk) or None
//   -> out (B, H, Tq, D) dtype of q, lse (B, H, Tq) float32
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t window, double softcap) {
  check_inputs("fastgpt::attention_fwd", q_in, k_in, v_in, key_padding_mask, dropout_p, window, softcap);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  std::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, Tq, D)
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.size(2) <= kDecodeMaxQueries) {  // a decode step: split over the keys (attention_decode.cpp)
    attention_decode_fwd_cpu(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap, out, lse);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    const auto pb = make_problem<scalar_t>(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && kBf16DotBuilt) {
      if (has_bf16_dot()) {
        forward<scalar_t, float, true>(pb, out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
        return;
      }
    }
    forward<scalar_t, acc_type<scalar_t>, false>(pb, out.mutable_data_ptr<scalar_t>(),
                                                 lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// grad_out, out (B, H, Tq, D), lse (B, H, Tq) float32, the forward's inputs
//   -> grad_q (B, H, Tq, D), grad_k, grad_v (B, Hkv, Tk, D)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    double dropout_p, int64_t seed, int64_t window, double softcap, const std::optional<at::Tensor>& grad_lse_in) {
  check_inputs("fastgpt::attention_bwd", q_in, k_in, v_in, key_padding_mask, dropout_p, window, softcap);
  check_attention_bwd_inputs("fastgpt::attention_bwd", grad_out_in, q_in, out_in, lse_in, grad_lse_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.has_value() ? grad_lse_in->contiguous() : at::Tensor();
  std::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  at::Tensor grad_k = at::empty(k.sizes(), k.options());  // (B, Hkv, Tk, D): every row written once
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  at::Tensor grad_q;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto pb = make_problem<scalar_t>(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap);
    const auto acc_options = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

    // delta (B, H, Tq) = rowsum(dO ∘ O) - grad_lse, in acc_t: d lse_i / d s_ij = P_ij, so a
    // gradient of lse enters dS = P ∘ (dP - delta) through delta.
    at::Tensor delta = at::empty({B, H, Tq}, acc_options);
    const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* out_data = out.const_data_ptr<scalar_t>();
    const float* grad_lse_data = grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr;
    acc_t* delta_data = delta.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * H * Tq, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        acc_t sum = 0;
        for (int64_t d = 0; d < D; ++d)
          sum += static_cast<acc_t>(grad_out_data[row * D + d]) *
                 static_cast<acc_t>(out_data[row * D + d]);
        delta_data[row] = grad_lse_data != nullptr ? sum - static_cast<acc_t>(grad_lse_data[row]) : sum;
      }
    });

    // dq_partial (G, B, H, Tq, D): grad_q itself when there is one group and no conversion.
    const int64_t groups = key_groups(B * pb.Hkv, (pb.Tk + kBwdKeys - 1) / kBwdKeys);
    const bool direct = groups == 1 && std::is_same_v<acc_t, scalar_t>;
    at::Tensor dq_partial = direct ? at::zeros(q.sizes(), q.options())
                                   : at::zeros({groups, B, H, Tq, D}, acc_options);
    const Gradients<scalar_t, acc_t> g{grad_out_data,
                                       lse.const_data_ptr<float>(),
                                       delta_data,
                                       dq_partial.mutable_data_ptr<acc_t>(),
                                       grad_k.mutable_data_ptr<scalar_t>(),
                                       grad_v.mutable_data_ptr<scalar_t>()};
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && kBf16DotBuilt) {
      if (has_bf16_dot())
        backward<scalar_t, acc_t, true>(pb, g, groups);
      else
        backward<scalar_t, acc_t, false>(pb, g, groups);
    } else {
      backward<scalar_t, acc_t, false>(pb, g, groups);
    }
    grad_q = direct ? dq_partial : dq_partial.sum(0).to(q.scalar_type());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastgpt
