// Attention forward for decoding (Tq <= kDecodeMaxQueries), split-KV ("flash-decoding").
//
// Why a second forward: with a handful of queries per head, the prefill kernel's blocks of
// 64-128 query rows are nearly empty, and its grid of one block per (batch, head) leaves most
// SMs idle at long Tk, while the work is dominated by reading K and V once. So this kernel is
// built around the K/V stream, not around tensor cores:
//   - one block per (batch, kv head, chunk of keys[, block of rows]): the keys are split into
//     chunks attended in parallel, so B * Hkv heads still fill the GPU (the host picks the chunk
//     count from the SM count: plan_attention_decode, attention.h);
//   - a block holds, as rows, every query of the kv head's whole GQA group: row r is query head
//     hk * kv_group + r / Tq, query r % Tq (kDecodeRowsPerBlock rows per block, more rows take
//     more blocks along grid.z), so each K/V byte is read from memory once per group, not once
//     per query head;
//   - within a block the warps split the chunk's keys; a warp reads a K and a V row as 16-byte
//     vectors, kLanesPerKey lanes per row (several keys at once for small D), and reduces the
//     q·k partial dot products with xor shuffles (a butterfly: every lane of the key ends with
//     the same bits, so the lanes' softmax states agree without further exchange);
//   - the softmax is online in float32, in log2 units (scale·log2(e) folded in, exp2 only), as
//     the prefill kernel's (attention_fwd.cuh): per row and lane state (m, l, acc) with
//       m = max of the visible scores seen, l = Σ exp2(s_j - m), acc = Σ exp2(s_j - m)·keep_j·V_j;
//     at the end the states of a warp's key lanes, then of the block's warps (through shared
//     memory), merge by the same rescaling: (m, l, acc) ⊕ (m', l', acc') with M = max(m, m') is
//     (M, l·2^(m-M) + l'·2^(m'-M), acc·2^(m-M) + acc'·2^(m'-M));
//   - each chunk then writes its normalised output o = acc·dropout_scale / l and its lse
//     m + log2 l (-inf and o = 0 when it saw no key) to a float32 workspace, and a second kernel
//     merges the chunks of every row exactly: with M = max lse_s, weights w_s = 2^(lse_s - M) (0
//     for a chunk without keys, never NaN), out = Σ w_s o_s / Σ w_s, lse = (M + log2 Σ w_s)·ln 2.
//     With a single chunk the decode kernel writes out and lse itself.
// The result is the prefill kernel's (same masking, softcap, Philox dropout keyed by the query
// head and element i * Tk + j, natural-log lse), so the backward kernel runs unchanged on it.
//
// Chunks cover only the keys some query may see (decode_key_range: causal and window bounds),
// and an iteration wholly visible to every query skips the masking. Head dims: compiled for a
// width kHeadDim with the actual D <= kHeadDim from the params; the lanes whose vectors lie
// beyond D load nothing and hold zeros.
//
// Tensors at the kernel boundary: q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) with rows on 16-byte
// boundaries (attention.cu's kernel_layout); out (B, Hq, Tq, D) contiguous, lse (B, Hq, Tq)
// float32; workspace partial_out (num_splits, B, Hq, Tq, D), partial_lse (num_splits, B, Hq, Tq)
// float32 (attention.h: DecodeSplits). Row g = (b * Hq + h) * Tq + i of out is row
// (b * Hkv + hk) * kv_group * Tq + r of a block's numbering, so blocks write their rows in place.
#pragma once
#include "cuda/attention_common.cuh"

namespace fastgpt::cuda {

template <typename Element, int kHeadDim>
struct DecodeConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kDecodeRowsPerBlock;
  static constexpr int kVec = kVecElems<Element>;             // elements per 16-byte vector
  static constexpr int kRowVecs = kHeadDim / kVec;            // vectors in a K / V row
  static constexpr int kLanesPerKey = kRowVecs < 32 ? kRowVecs : 32;
  static constexpr int kVecsPerLane = kRowVecs / kLanesPerKey;
  static constexpr int kLaneElems = kVecsPerLane * kVec;      // columns a lane owns
  static constexpr int kKeysPerStep = 32 / kLanesPerKey;      // keys a warp reads at once
  // Steps unrolled per iteration: their loads are in flight together (fewer at 2 vectors a lane).
  static constexpr int kUnroll = kVecsPerLane > 1 ? 1 : 2;
  static constexpr int kWarpKeys = kKeysPerStep * kUnroll;    // consecutive keys of a warp per iteration
  static constexpr int kBlockKeys = kWarps * kWarpKeys;
  // The warps' merged states: acc (kWarps, kRows, kHeadDim), then m and l (kWarps, kRows).
  static constexpr size_t kSmemBytes = sizeof(float) * kWarps * kRows * (kHeadDim + 2);
  static_assert(kRowVecs * kVec == kHeadDim && kRowVecs % kLanesPerKey == 0 && 32 % kLanesPerKey == 0);
  static_assert(kSmemBytes <= 48 * 1024, "static launch: within the default dynamic shared memory");
};

// A 16-byte load from global memory (under the emulator: checked for alignment and for lying
// inside an input tensor).
__device__ __forceinline__ uint4 load_global_16(const void* address) {
#if defined(FASTGPT_EMULATION)
  emulation::check_global(address, "decode load");
  return *static_cast<const uint4*>(address);
#else
  return __ldg(static_cast<const uint4*>(address));
#endif
}

// The kVec elements at a 16-byte aligned global address, as floats (the bytes copied, never
// type-punned, so that host compilers of the emulation see them too).
template <typename Element>
__device__ __forceinline__ void load_floats(const Element* address, float (&out)[kVecElems<Element>]) {
  const uint4 raw = load_global_16(address);
  Element values[kVecElems<Element>];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int i = 0; i < kVecElems<Element>; ++i) out[i] = to_float(values[i]);
}

// (m, l, acc) ⊕= (m', l', acc'): returns the factors that rescale the two states.
__device__ __forceinline__ void merge_factors(float m, float m_other, float& new_m, float& mine, float& other) {
  new_m = fmaxf(m, m_other);
  const float base = new_m == -INFINITY ? 0.0f : new_m;  // both empty: factors exp2(-inf) = 0, no NaN
  mine = exp2f(m - base);
  other = exp2f(m_other - base);
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(DecodeConfig<Element, kHeadDim>::kThreads)
    attention_decode_kernel(const AttentionParams p, const DecodeSplits splits) {
  using Cfg = DecodeConfig<Element, kHeadDim>;
  constexpr int kRows = Cfg::kRows, kVec = Cfg::kVec, kLanesPerKey = Cfg::kLanesPerKey;
  constexpr int kVecsPerLane = Cfg::kVecsPerLane, kLaneElems = Cfg::kLaneElems, kUnroll = Cfg::kUnroll;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_lane = lane / kLanesPerKey, dim_lane = lane % kLanesPerKey;
  const int batch_kv = blockIdx.x, batch = batch_kv / p.kv_heads, kv_head = batch_kv % p.kv_heads;
  const int split = blockIdx.y;
  const int rows_total = p.kv_group * p.q_len;
  const int row0 = blockIdx.z * kRows;
  const int n_rows = min(kRows, rows_total - row0);  // uniform over the block: rows >= n_rows are skipped
  const int head_dim = p.head_dim;

  const Element* k = offset_pointer<Element>(p.k, batch, kv_head, p.k_batch_stride, p.k_head_stride);
  const Element* v = offset_pointer<Element>(p.v, batch, kv_head, p.v_batch_stride, p.v_head_stride);
  const Visibility visible(p, batch);

  int key_begin, key_end;
  decode_key_range(p, &key_begin, &key_end);
  const int64_t chunk_first = int64_t(key_begin) + int64_t(split) * splits.chunk;
  const int chunk_begin = int(chunk_first < key_end ? chunk_first : key_end);
  const int chunk_end = int(chunk_first + splits.chunk < key_end ? chunk_first + splits.chunk : key_end);

  // The lane's columns: vector c of the lane is row vector c * kLanesPerKey + dim_lane.
  auto column = [&](int c) { return (c * kLanesPerKey + dim_lane) * kVec; };

  // Row r of the block: query head kv_head * kv_group + (row0 + r) / Tq, query (row0 + r) % Tq.
  auto query_of = [&](int r) { return (row0 + r) % p.q_len; };
  auto batch_head_of = [&](int r) { return batch * p.heads + kv_head * p.kv_group + (row0 + r) / p.q_len; };

  // q stays packed in its 16-bit type (half the registers of floats), unpacked at each use; the
  // states (m, l, acc) per row. Unrolled over r, so all of it lives in registers.
  uint4 q[kRows][kVecsPerLane];
  float m[kRows], l[kRows], acc[kRows][kLaneElems];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = r < n_rows ? r : 0;
    const Element* q_row = offset_pointer<Element>(p.q, batch, batch_head_of(row) - batch * p.heads,
                                                   p.q_batch_stride, p.q_head_stride) +
                           int64_t(query_of(row)) * p.q_row_stride;
#pragma unroll
    for (int c = 0; c < kVecsPerLane; ++c) {
      q[r][c] = make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in every element type
      if (r < n_rows && column(c) < head_dim) q[r][c] = load_global_16(q_row + column(c));
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) acc[r][e] = 0.0f;
  }

  for (int key0 = chunk_begin; key0 < chunk_end; key0 += Cfg::kBlockKeys) {
    const int warp_key0 = key0 + warp * Cfg::kWarpKeys;
    // Every load of the iteration first (kUnroll steps of K and V in flight), as floats.
    float kf[kUnroll][kLaneElems], vf[kUnroll][kLaneElems];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = warp_key0 + u * Cfg::kKeysPerStep + key_lane;
#pragma unroll
      for (int c = 0; c < kVecsPerLane; ++c) {
        float kv[kVec], vv[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) kv[e] = vv[e] = 0.0f;
        if (key < chunk_end && column(c) < head_dim) {
          load_floats(k + int64_t(key) * p.k_row_stride + column(c), kv);
          load_floats(v + int64_t(key) * p.v_row_stride + column(c), vv);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) kf[u][c * kVec + e] = kv[e], vf[u][c * kVec + e] = vv[e];
      }
    }
    // Whether some (query, key) pair of the iteration is hidden (uniform over the block).
    const bool needs_mask = key0 + Cfg::kBlockKeys > chunk_end ||
                            visible.tile_needs_mask(0, p.q_len, key0, Cfg::kBlockKeys);

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) continue;  // uniform: the shuffles below see the whole warp
      float s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kVecsPerLane; ++c) {
          Element q_values[kVec];
          memcpy(q_values, &q[r][c], sizeof(uint4));
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot = fmaf(to_float(q_values[e]), kf[u][c * kVec + e], dot);
        }
#pragma unroll
        for (int offset = 1; offset < kLanesPerKey; offset *= 2) dot += __shfl_xor_sync(kFullWarp, dot, offset);
        // Scale (and soft-cap) first, then mask: a hidden score is -inf.
        s[u] = score_log2(p, dot);
        const int key = warp_key0 + u * Cfg::kKeysPerStep + key_lane;
        if (needs_mask && !(key < chunk_end && visible(query_of(r), key))) s[u] = -INFINITY;
      }
      float step_max = s[0];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) step_max = fmaxf(step_max, s[u]);
      const float new_m = fmaxf(m[r], step_max);
      // Nothing visible yet: new_m = -inf, and exp2(s - 0) of the -inf scores is the correct 0.
      const float base = new_m == -INFINITY ? 0.0f : new_m;
      const float rescale = exp2f(m[r] - base);
      m[r] = new_m;
      float weight[kUnroll], sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        weight[u] = exp2f(s[u] - base);
        sum += weight[u];
      }
      l[r] = l[r] * rescale + sum;
      // Dropout acts on the normalised weights: it changes what enters acc, not l.
      if (p.dropout_p > 0.0f) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int key = warp_key0 + u * Cfg::kKeysPerStep + key_lane;
          if (weight[u] != 0.0f && !dropout_keeps(p, batch_head_of(r), query_of(r), key)) weight[u] = 0.0f;
        }
      }
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) {
        float value = acc[r][e] * rescale;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) value = fmaf(weight[u], vf[u][e], value);
        acc[r][e] = value;
      }
    }
  }

  // Merge the warp's key lanes (lanes dim_lane + kLanesPerKey * j): butterfly over the high lane bits.
#pragma unroll
  for (int offset = kLanesPerKey; offset < 32; offset *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) continue;
      float new_m, mine, other;
      merge_factors(m[r], __shfl_xor_sync(kFullWarp, m[r], offset), new_m, mine, other);
      m[r] = new_m;
      l[r] = l[r] * mine + __shfl_xor_sync(kFullWarp, l[r], offset) * other;
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) {
        acc[r][e] = acc[r][e] * mine + __shfl_xor_sync(kFullWarp, acc[r][e], offset) * other;
      }
    }
  }

  // Then the warps, through shared memory: acc (kWarps, kRows, kHeadDim), m, l (kWarps, kRows).
  float* const smem_acc = reinterpret_cast<float*>(dynamic_smem());
  float* const smem_m = smem_acc + Cfg::kWarps * kRows * kHeadDim;
  float* const smem_l = smem_m + Cfg::kWarps * kRows;
  if (key_lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) continue;
#pragma unroll
      for (int c = 0; c < kVecsPerLane; ++c) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) smem_acc[(warp * kRows + r) * kHeadDim + column(c) + e] = acc[r][c * kVec + e];
      }
      if (dim_lane == 0) smem_m[warp * kRows + r] = m[r], smem_l[warp * kRows + r] = l[r];
    }
  }
  __syncthreads();

  // Each thread finishes 4 columns of a row at a time: merged, normalised, written.
  const int groups = head_dim / 4;  // D is a multiple of 8
  const int64_t total_rows = int64_t(p.batch) * p.heads * p.q_len;
  for (int item = threadIdx.x; item < n_rows * groups; item += Cfg::kThreads) {
    const int r = item / groups, col = 4 * (item % groups);
    float row_m = -INFINITY;
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) row_m = fmaxf(row_m, smem_m[w * kRows + r]);
    const float base = row_m == -INFINITY ? 0.0f : row_m;
    float row_l = 0.0f, o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) {
      const float factor = exp2f(smem_m[w * kRows + r] - base);
      row_l += smem_l[w * kRows + r] * factor;
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] += smem_acc[(w * kRows + r) * kHeadDim + col + e] * factor;
    }
    // row_l >= 1 whenever a key was visible (the maximum contributes exp2(0)); 0 means none.
    const float out_scale = row_l > 0.0f ? p.dropout_scale / row_l : 0.0f;
    const float lse_log2 = row_m == -INFINITY ? -INFINITY : row_m + log2f(row_l);
    const int64_t g = int64_t(batch_kv) * rows_total + row0 + r;  // = (b * Hq + h) * Tq + i
    if (splits.num_splits == 1) {
      Element* out = static_cast<Element*>(p.out) + g * head_dim + col;
#pragma unroll
      for (int e = 0; e < 4; ++e) out[e] = from_float<Element>(o[e] * out_scale);
      if (col == 0) p.lse[g] = lse_log2 * kLn2;
    } else {
      const int64_t partial = int64_t(split) * total_rows + g;
      float4 value;
      value.x = o[0] * out_scale, value.y = o[1] * out_scale, value.z = o[2] * out_scale, value.w = o[3] * out_scale;
      *reinterpret_cast<float4*>(splits.partial_out + partial * head_dim + col) = value;
      if (col == 0) splits.partial_lse[partial] = lse_log2;
    }
  }
}

constexpr int kDecodeMergeThreads = 128;

// One thread per 4 columns of an output row: the log-sum-exp merge of the row's chunks.
template <typename Element>
__global__ void __launch_bounds__(kDecodeMergeThreads)
    attention_decode_merge_kernel(const AttentionParams p, const DecodeSplits splits) {
  const int groups = p.head_dim / 4;
  const int64_t total_rows = int64_t(p.batch) * p.heads * p.q_len;
  const int64_t item = int64_t(blockIdx.x) * kDecodeMergeThreads + threadIdx.x;
  if (item >= total_rows * groups) return;
  const int64_t g = item / groups;
  const int col = 4 * int(item % groups);
  float row_m = -INFINITY;
  for (int s = 0; s < splits.num_splits; ++s) row_m = fmaxf(row_m, splits.partial_lse[s * total_rows + g]);
  float sum = 0.0f, o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (row_m != -INFINITY) {
    for (int s = 0; s < splits.num_splits; ++s) {
      const float weight = exp2f(splits.partial_lse[s * total_rows + g] - row_m);  // 0 for a chunk without keys
      const float4 value = *reinterpret_cast<const float4*>(splits.partial_out + (s * total_rows + g) * p.head_dim + col);
      sum += weight;
      o[0] = fmaf(weight, value.x, o[0]), o[1] = fmaf(weight, value.y, o[1]);
      o[2] = fmaf(weight, value.z, o[2]), o[3] = fmaf(weight, value.w, o[3]);
    }
  }
  const float out_scale = sum > 0.0f ? 1.0f / sum : 0.0f;  // sum >= 1 when some chunk saw a key
  Element* out = static_cast<Element*>(p.out) + g * p.head_dim + col;
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = from_float<Element>(o[e] * out_scale);
  if (col == 0) p.lse[g] = row_m == -INFINITY ? -INFINITY : (row_m + log2f(sum)) * kLn2;
}

template <typename Element, int kHeadDim>
void launch_attention_decode(const AttentionParams& params, const DecodeSplits& splits, cudaStream_t stream) {
  using Cfg = DecodeConfig<Element, kHeadDim>;
  const dim3 grid = launch_grid("the attention decode (B * Hkv, key chunks, row blocks)",
                                int64_t(params.batch) * params.kv_heads, splits.num_splits, splits.row_blocks);
  const int64_t items = int64_t(params.batch) * params.heads * params.q_len * (params.head_dim / 4);
  const dim3 merge_grid = launch_grid("the attention decode merge (B * Hq * Tq * D / 4 items)",
                                      (items + kDecodeMergeThreads - 1) / kDecodeMergeThreads);
  launch_kernel(attention_decode_kernel<Element, kHeadDim>, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, params,
                splits);
  if (splits.num_splits > 1) {
    launch_kernel(attention_decode_merge_kernel<Element>, merge_grid, kDecodeMergeThreads, 0, stream, params, splits);
  }
}

}  // namespace fastgpt::cuda

// The whole of attention_decode_<dtype>.cu: launch_attention_decode<Element, W> for every kernel
// width of attention.h, one dtype per file as the prefill kernels.
#define FASTGPT_INSTANTIATE_ATTENTION_DECODE_ONE(Element, D) \
  template void launch_attention_decode<Element, D>(const AttentionParams&, const DecodeSplits&, cudaStream_t);
#define FASTGPT_INSTANTIATE_ATTENTION_DECODE(Element) \
  namespace fastgpt::cuda { FASTGPT_ATTENTION_KERNEL_WIDTHS(FASTGPT_INSTANTIATE_ATTENTION_DECODE_ONE, Element) }
