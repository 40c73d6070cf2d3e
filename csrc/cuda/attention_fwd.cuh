// Attention forward, FlashAttention-2 style.
//
// One thread block per (batch, head, tile of kBlockM query rows); warp w owns query rows
// [16w, 16w + 16) of the tile. K and V stream through shared memory in tiles of kBlockN
// keys, double-buffered with cp.async (the next tile loads while this one computes).
// For each key tile a warp computes its 16 x kBlockN scores S = Q Kᵀ in registers,
// updates the online softmax, and accumulates O += P V, P never leaving registers on
// the tensor-core path. The scores are kept in log2 units (scale·log2(e) folded in) so
// that every exponential is one exp2.
//
// Online-softmax invariant, per query row, after the key tiles seen so far:
//   row_max = max of the visible scaled scores (-inf while none is visible),
//   row_sum = Σ exp2(s_j - row_max),  acc = Σ exp2(s_j - row_max) · keep_j · V_j
// (keep_j: the dropout decision); a new tile with a larger maximum rescales both by
// exp2(old_max - new_max). At the end O = acc · dropout_scale / row_sum and
// lse = (row_max + log2 row_sum) · ln 2, the natural-log log-sum-exp.
//
// float16 / bfloat16 run on tensor cores (mma.sync); float32 inputs take the same kernel
// with SIMT float32 FMAs in place of the MMAs (exact float32 math, several times slower).
//
// Key tiles run from the last to the first, so tiles that need masking (the causal
// diagonal, the ragged end of the keys) come first; tiles wholly above the causal
// diagonal or outside the sliding window are never loaded; tiles wholly visible skip the
// masking code. GQA / MQA: query head h reads kv head h / (Hq / Hkv) in place. A logit
// softcap c turns the natural score s into c·tanh(s / c) before the mask (score_log2).
//
// Head dims: the kernel is compiled for a width kHeadDim and reads the actual D <= kHeadDim
// from the params (attention.h): columns >= D load as zeros, the GEMM steps over them are
// skipped, and only columns < D are stored. At kHeadDim = 256 the O strip alone takes 128
// accumulator registers per thread, so the warp's Q strip is re-read from shared memory for
// every key tile instead of being held in registers, and the key tiles are halved (to keep
// the shared memory within an sm_80 SM's 163 KB: Q + 2 stages of K and V).
#pragma once
#include "cuda/attention_common.cuh"

namespace fastgpt::cuda {

template <typename Element, int kHeadDim>
struct FwdConfig {
  static constexpr bool kTensorCores = !kIsFloat32<Element>;
  static constexpr int kWarps = kTensorCores ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;             // query rows per block
  static constexpr int kBlockN = (kTensorCores ? 64 : 32) / (kHeadDim > 128 ? 2 : 1);  // keys per pipeline stage
  static constexpr bool kQInRegisters = kTensorCores && kHeadDim <= 128;  // else Q is re-read from smem
  using Tile = SmemTile<Element, kHeadDim>;               // Q (kBlockM rows), K, V (kBlockN rows)
  using PTile = SmemTile<Element, kBlockN>;               // SIMT path only: P goes through smem
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kPElems = kTensorCores ? 0 : kBlockM * kBlockN;
  // Q | K stage 0 | K stage 1 | V stage 0 | V stage 1 | P
  static constexpr size_t kSmemBytes = sizeof(Element) * (kQElems + 4 * kKVElems + kPElems);
  static_assert(kSmemBytes <= 163 * 1024, "must fit the dynamic shared memory of an sm_80 block");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(FwdConfig<Element, kHeadDim>::kThreads)
    attention_fwd_kernel(const AttentionParams p) {
  using Cfg = FwdConfig<Element, kHeadDim>;
  using Tile = typename Cfg::Tile;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kSTiles = kBlockN / 8;   // 8-column accumulator tiles of a warp's scores (16 x kBlockN)
  constexpr int kOTiles = kHeadDim / 8;  // ... of its output rows (16 x D)

  unsigned char* const smem = dynamic_smem();
  Element* const smem_elements = reinterpret_cast<Element*>(smem);
  const Tile q_tile{smem_elements};
  // Stage s of K is at k_base + s * kKVElems (arithmetic, not an array: no local memory).
  Element* const k_base = smem_elements + Cfg::kQElems;
  Element* const v_base = smem_elements + Cfg::kQElems + 2 * Cfg::kKVElems;
  auto k_tile = [&](int stage) { return Tile{k_base + stage * Cfg::kKVElems}; };
  auto v_tile = [&](int stage) { return Tile{v_base + stage * Cfg::kKVElems}; };
  const typename Cfg::PTile p_tile{smem_elements + Cfg::kQElems + 4 * Cfg::kKVElems};

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int batch_head = blockIdx.x, batch = batch_head / p.heads, head = batch_head % p.heads;
  const int row0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;  // longest causal rows first: a shorter tail
  const int warp_row0 = 16 * warp;                          // the warp's rows within the tile
  // The two query rows this lane holds in every accumulator (g and g + 8 of the strip).
  const int rows[2] = {row0 + warp_row0 + lane / 4, row0 + warp_row0 + lane / 4 + 8};

  const Element* q = offset_pointer<Element>(p.q, batch, head, p.q_batch_stride, p.q_head_stride);
  const int kv_head = head / p.kv_group;  // GQA / MQA: the group's shared k, v, never repeated
  const Element* k = offset_pointer<Element>(p.k, batch, kv_head, p.k_batch_stride, p.k_head_stride);
  const Element* v = offset_pointer<Element>(p.v, batch, kv_head, p.v_batch_stride, p.v_head_stride);
  const Visibility visible(p, batch);
  const int head_dim = p.head_dim;  // <= kHeadDim: the columns beyond are zeros, skipped

  // Key tiles [tile_begin, tile_end) include every key visible to some row of this block
  // (causal and window bounds); the others are never loaded.
  const int last_row = min(row0 + kBlockM, p.q_len) - 1;
  const int key_begin = visible.key_begin(row0), key_end = visible.key_end(last_row);
  const int tile_begin = key_begin / kBlockN;
  const int tile_end = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : tile_begin;
  const int n_tiles = tile_end - tile_begin;

  auto load_kv = [&](int tile, int stage) {
    const int key0 = tile * kBlockN;
    load_tile_async<kBlockN, kThreads>(k_tile(stage), k + key0 * p.k_row_stride, p.k_row_stride, p.k_len - key0,
                                       head_dim);
    load_tile_async<kBlockN, kThreads>(v_tile(stage), v + key0 * p.v_row_stride, p.v_row_stride, p.k_len - key0,
                                       head_dim);
  };

  load_tile_async<kBlockM, kThreads>(q_tile, q + row0 * p.q_row_stride, p.q_row_stride, p.q_len - row0, head_dim);
  if (n_tiles > 0) load_kv(tile_end - 1, 0);
  cp_async_commit();

  float row_max[2] = {-INFINITY, -INFINITY};  // per held row, in log2 units; the 4 lanes of a quad agree
  float row_sum[2] = {0.0f, 0.0f};            // this lane's share; summed over the quad at the end
  float acc[kOTiles][4];                      // O strip (16 x D), unnormalised
  zero(acc);

  cp_async_wait<0>();
  __syncthreads();
  // The warp's Q strip as A operands, when held in registers (k-steps beyond the head dim unused).
  [[maybe_unused]] RegisterA<kHeadDim / 16> q_regs;
  if constexpr (Cfg::kQInRegisters) {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      if (16 * ks < head_dim) load_a(q_regs.frag[ks], row_major(q_tile, warp_row0, 0), ks);
    }
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int tile = tile_end - 1 - it, stage = it % 2, key0 = tile * kBlockN;
    if (it + 1 < n_tiles) load_kv(tile - 1, stage ^ 1);  // its stage was released by the last __syncthreads
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();

    // S = Q Kᵀ: B(k = d, n = key) = K(key, d).
    float s[kSTiles][4];
    zero(s);
    if constexpr (Cfg::kQInRegisters) {
      warp_gemm_tensor_cores<Element, kHeadDim>(s, q_regs, transposed(k_tile(stage), 0, 0), head_dim);
    } else if constexpr (Cfg::kTensorCores) {
      warp_gemm_tensor_cores<Element, kHeadDim>(s, row_major(q_tile, warp_row0, 0), transposed(k_tile(stage), 0, 0),
                                                head_dim);
    } else {
      warp_gemm_simt<kHeadDim>(s, row_major(q_tile, warp_row0, 0), transposed(k_tile(stage), 0, 0), head_dim);
    }

    // Scale (the scale may be negative) and soft-cap first, then mask: a hidden score is -inf.
    const bool needs_mask = visible.tile_needs_mask(row0, kBlockM, key0, kBlockN);
#pragma unroll
    for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = score_log2(p, s[n][e]);
        if (needs_mask && !visible(rows[e / 2], key0 + 8 * n + 2 * t + e % 2)) s[n][e] = -INFINITY;
      }
    }

    // Online softmax; e / 2 selects the held row.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 2));
      const float new_max = fmaxf(row_max[half], tile_max);
      // A row with nothing visible yet has new_max = -inf; exp2(-inf - (-inf)) would be
      // NaN, exp2(s - 0) of its all -inf scores is the correct 0.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = exp2f(row_max[half] - base);
      row_max[half] = new_max;
      row_sum[half] *= rescale;
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        acc[n][2 * half] *= rescale;
        acc[n][2 * half + 1] *= rescale;
      }
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[n][e] = exp2f(s[n][e] - base);
          row_sum[half] += s[n][e];
        }
      }
    }

    // Dropout acts on the normalised weights, so it changes what enters O, not row_sum.
    if (p.dropout_p > 0.0f) {
#pragma unroll
      for (int n = 0; n < kSTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!dropout_keeps(p, batch_head, rows[e / 2], key0 + 8 * n + 2 * t + e % 2)) s[n][e] = 0.0f;
        }
      }
    }

    // O += P V: B(k = key, n = d) = V(key, d).
    if constexpr (Cfg::kTensorCores) {
      warp_gemm_tensor_cores<Element, kBlockN>(acc, accumulators_as_a<Element>(s), row_major(v_tile(stage), 0, 0),
                                               kBlockN, head_dim);
    } else {
      store_accumulators(p_tile, warp_row0, 0, s);  // the warp's own rows of P
      __syncwarp();
      warp_gemm_simt<kBlockN>(acc, row_major(p_tile, warp_row0, 0), row_major(v_tile(stage), 0, 0), kBlockN,
                              head_dim);
    }
    __syncthreads();  // all warps are done with this stage (and P) before it is refilled
  }

  // Epilogue: normalise, write lse and O (through the Q tile, for 16-byte stores).
  float out_scale[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(kFullWarp, sum, 1);
    sum += __shfl_xor_sync(kFullWarp, sum, 2);
    // sum >= 1 whenever a key is visible (the maximum contributes exp2(0)); 0 means none.
    out_scale[half] = sum > 0.0f ? p.dropout_scale / sum : 0.0f;
    const float lse = row_max[half] == -INFINITY ? -INFINITY : (row_max[half] + log2f(sum)) * kLn2;
    if (t == 0 && rows[half] < p.q_len) p.lse[int64_t(batch_head) * p.q_len + rows[half]] = lse;
  }
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] *= out_scale[e / 2];
  }
  __syncthreads();  // Q tile no longer read by any warp
  store_accumulators(q_tile, warp_row0, 0, acc);
  __syncthreads();
  Element* out = static_cast<Element*>(p.out) + (int64_t(batch_head) * p.q_len + row0) * head_dim;
  store_tile<kBlockM, kThreads>(q_tile, out, p.q_len - row0, head_dim);
}

template <typename Element, int kHeadDim>
void launch_attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = FwdConfig<Element, kHeadDim>;
  auto kernel = attention_fwd_kernel<Element, kHeadDim>;
  const dim3 grid = launch_grid("the attention forward (B * H, query tiles)", int64_t(params.batch) * params.heads,
                                (int64_t(params.q_len) + Cfg::kBlockM - 1) / Cfg::kBlockM);
  allow_shared_memory(kernel, Cfg::kSmemBytes, "the attention forward kernel");
  launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, params);
}

}  // namespace fastgpt::cuda

// The whole of attention_fwd_<dtype>.cu: launch_attention_fwd<Element, W> for every kernel width
// of attention.h, one dtype per file so that the CUDA build is parallel and incremental.
#define FASTGPT_INSTANTIATE_ATTENTION_FWD_ONE(Element, D) \
  template void launch_attention_fwd<Element, D>(const AttentionParams&, cudaStream_t);
#define FASTGPT_INSTANTIATE_ATTENTION_FWD(Element) \
  namespace fastgpt::cuda { FASTGPT_ATTENTION_KERNEL_WIDTHS(FASTGPT_INSTANTIATE_ATTENTION_FWD_ONE, Element) }
