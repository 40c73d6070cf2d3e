// Attention backward, FlashAttention-2 style, in three launches:
//   1. delta:  D_i = Σ_d dO[i, d] · O[i, d]  (= Σ_j P̃_ij dP̃_ij, also under dropout), minus the
//              gradient of lse_i when the caller differentiates through it (d lse_i / d s_ij = P_ij);
//   2. main:   one thread block per (batch, kv head, tile of kBlockN keys); warp w owns keys
//              [16w, 16w + 16). It walks the query tiles that can see its keys (causal and
//              window bounds), of every query head of the kv head's GQA group, with Q,
//              dO, lse and D double-buffered through shared memory, and recomputes the
//              probabilities from the saved log-sum-exp instead of storing them:
//                Sᵀ = K Qᵀ,  Pᵀ = exp(scale·Sᵀ - lse),   dP̃ᵀ = V dOᵀ,
//                dropout: P̃ = P·keep/(1-p),  dP = dP̃·keep/(1-p),
//                dSᵀ = Pᵀ ∘ (dPᵀ - D) (· (1 - tanh²) under a softcap),
//                dV += P̃ᵀ dO,  dK += dSᵀ Q,  dQ += dS K.
//              Working with the transposed scores puts keys on the accumulator rows,
//              so P̃ᵀ and dSᵀ are already the A operands of the dV and dK GEMMs. dK and
//              dV stay in registers for the whole walk; dQ (shared by all key blocks)
//              is added to a float32 buffer with atomics, after dSᵀ goes through
//              shared memory to be re-read as dS;
//   3. convert: dQ = scale · dQ_accum, cast to the input dtype.
//
// Head dims: as in the forward (attention_fwd.cuh), the kernels are compiled for a width
// kHeadDim and read D <= kHeadDim from the params; columns >= D load as zeros, the GEMM steps
// over them are skipped (on the float32 path only those along k: that kernel is at the
// register limit, and runtime column bounds make ptxas spill), and only columns < D are
// stored or added to dQ. At kHeadDim = 256 a warp's 16 rows of dK and dV would take 256
// accumulator registers per thread, so each 16-key strip belongs to kDSplit = 2 warps that
// both compute its scores (over all of D: the two score GEMMs run twice, 7 GEMMs of work
// instead of 5, no exchange through shared memory) and each keep half of the columns of dK
// and dV; the query tiles are halved to fit an sm_80 SM.
#pragma once
#include "cuda/attention_common.cuh"

namespace fastgpt::cuda {

constexpr float kLog2e = 1.4426950408889634f;

template <typename Element, int kHeadDim>
struct BwdConfig {
  static constexpr bool kTensorCores = !kIsFloat32<Element>;
  static constexpr int kDSplit = kHeadDim > 128 ? 2 : 1;  // warps per 16-key strip, each with kDkvCols of dK, dV
  static constexpr int kDkvCols = kHeadDim / kDSplit;
  static constexpr int kWarps = kTensorCores ? 4 * kDSplit : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kKeyStrips = kWarps / kDSplit;
  static constexpr int kBlockN = 16 * kKeyStrips;                    // keys per block
  static constexpr int kBlockM = (kTensorCores ? 64 : 32) / kDSplit;  // queries per step
  using Tile = SmemTile<Element, kHeadDim>;  // K, V (kBlockN rows); Q, dO (kBlockM rows)
  // dSᵀ (and P̃ᵀ on the SIMT path), keys x queries. The tensor cores read their own dSᵀ from
  // registers and the dQ GEMM reads the block's kBlockN rows, which the warps of column half 0
  // write. The SIMT GEMMs re-read the warp's own strip, so there every warp w writes its own
  // rows [16w, 16w + 16), and the two warps of a key strip never wait for each other.
  using STile = SmemTile<Element, kBlockM>;
  static constexpr int kSRows = kTensorCores ? kBlockN : 16 * kWarps;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kSElems = kSRows * kBlockM;
  static constexpr int kSTiles = kTensorCores ? 1 : 2;
  // K | V | Q stage 0, 1 | dO stage 0, 1 | dSᵀ | (P̃ᵀ) | lse·log2(e) stage 0, 1 | D stage 0, 1
  static constexpr size_t kElementBytes = sizeof(Element) * (2 * kKVElems + 4 * kQElems + kSTiles * kSElems);
  static constexpr size_t kSmemBytes = kElementBytes + sizeof(float) * 4 * kBlockM;
  static_assert(kSmemBytes <= 163 * 1024, "must fit the dynamic shared memory of an sm_80 block");
  // dQ = dS K: kBlockM / 16 row strips, each split over kWarps / strips warps by columns.
  static constexpr int kDqStrips = kBlockM / 16;
  static constexpr int kDqCols = kHeadDim / (kWarps / kDqStrips);
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(BwdConfig<Element, kHeadDim>::kThreads)
    attention_bwd_kernel(const AttentionParams p) {
  using Cfg = BwdConfig<Element, kHeadDim>;
  using Tile = typename Cfg::Tile;
  using STile = typename Cfg::STile;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kThreads = Cfg::kThreads;
  constexpr int kMTiles = kBlockM / 8;   // 8-column accumulator tiles of a warp's Sᵀ strip (16 x kBlockM)
  constexpr int kDTiles = Cfg::kDkvCols / 8;  // ... of its dK, dV block (16 x kDkvCols)
  constexpr int kDqTiles = Cfg::kDqCols / 8;

  unsigned char* const smem = dynamic_smem();
  Element* const elements = reinterpret_cast<Element*>(smem);
  const Tile k_tile{elements}, v_tile{elements + Cfg::kKVElems};
  Element* const q_base = elements + 2 * Cfg::kKVElems;
  // Stage s of Q is at q_base + s * kQElems, of dO two tiles further (arithmetic, not arrays:
  // no local memory).
  auto q_tile = [&](int stage) { return Tile{q_base + stage * Cfg::kQElems}; };
  auto do_tile = [&](int stage) { return Tile{q_base + (2 + stage) * Cfg::kQElems}; };
  const STile ds_tile{q_base + 4 * Cfg::kQElems};
  const STile pt_tile{q_base + 4 * Cfg::kQElems + Cfg::kSElems};  // SIMT path only
  float* const lse2_base = reinterpret_cast<float*>(smem + Cfg::kElementBytes);
  // (kBlockM,) per stage: lse·log2(e) of stage s at lse2_base + s·kBlockM, D two further.
  auto lse2 = [&](int stage) { return lse2_base + stage * kBlockM; };
  auto delta = [&](int stage) { return lse2_base + (2 + stage) * kBlockM; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // One block per (batch, kv head, key tile): it walks the query tiles of every query head of
  // the kv head's group, so dK, dV are summed in registers (deterministic, no atomics).
  const int batch_kv_head = blockIdx.x, batch = batch_kv_head / p.kv_heads, kv_head = batch_kv_head % p.kv_heads;
  const int key0 = blockIdx.y * kBlockN;
  const int warp_key0 = 16 * (warp % Cfg::kKeyStrips);                    // the warp's key strip in the block
  const int dkv_col0 = Cfg::kDSplit == 1 ? 0 : Cfg::kDkvCols * (warp / Cfg::kKeyStrips);  // its dK, dV columns
  const int keys[2] = {key0 + warp_key0 + g, key0 + warp_key0 + g + 8};  // rows this lane holds

  const Element* k = offset_pointer<Element>(p.k, batch, kv_head, p.k_batch_stride, p.k_head_stride);
  const Element* v = offset_pointer<Element>(p.v, batch, kv_head, p.v_batch_stride, p.v_head_stride);
  const Visibility visible(p, batch);
  const int head_dim = p.head_dim;  // <= kHeadDim: the columns beyond are zeros, skipped

  // Query tiles [m_begin, m_end) hold every query that sees a key of this block (causal:
  // query i sees key0 iff i >= key0 - causal_offset; a window bounds them from above too).
  // The walk is over steps (query head of the group, query tile), n_m tiles per head.
  const int key_last = min(key0 + kBlockN, p.k_len) - 1;
  const int query_begin = visible.query_begin(key0), query_end = visible.query_end(key_last, p.q_len);
  const int m_begin = query_begin / kBlockM;
  const int m_end = query_end > query_begin ? (query_end + kBlockM - 1) / kBlockM : m_begin;
  const int n_m = m_end - m_begin, n_steps = n_m * p.kv_group;
  auto step_head = [&](int step) { return kv_head * p.kv_group + step / n_m; };  // the query head
  auto step_m_tile = [&](int step) { return m_begin + step % n_m; };

  auto load_query_side = [&](int step, int stage) {
    const int head = step_head(step), query0 = step_m_tile(step) * kBlockM;
    const int64_t batch_head = int64_t(batch) * p.heads + head;
    const Element* q = offset_pointer<Element>(p.q, batch, head, p.q_batch_stride, p.q_head_stride);
    const Element* dout =
        offset_pointer<Element>(p.grad_out, batch, head, p.grad_out_batch_stride, p.grad_out_head_stride);
    const float* saved_lse = p.saved_lse + batch_head * p.q_len;
    const float* row_delta = p.delta + batch_head * p.q_len;
    load_tile_async<kBlockM, kThreads>(q_tile(stage), q + query0 * p.q_row_stride, p.q_row_stride,
                                       p.q_len - query0, head_dim);
    load_tile_async<kBlockM, kThreads>(do_tile(stage), dout + query0 * p.grad_out_row_stride,
                                       p.grad_out_row_stride, p.q_len - query0, head_dim);
    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      const int query = query0 + i;
      const float lse = query < p.q_len ? saved_lse[query] : -INFINITY;
      // Rows that see no key (lse = -inf) and padding rows get +inf: exp2(s - inf) = 0.
      lse2(stage)[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      delta(stage)[i] = query < p.q_len ? row_delta[query] : 0.0f;
    }
  };

  load_tile_async<kBlockN, kThreads>(k_tile, k + key0 * p.k_row_stride, p.k_row_stride, p.k_len - key0, head_dim);
  load_tile_async<kBlockN, kThreads>(v_tile, v + key0 * p.v_row_stride, p.v_row_stride, p.k_len - key0, head_dim);
  if (n_steps > 0) load_query_side(0, 0);
  cp_async_commit();

  float dk[kDTiles][4], dv[kDTiles][4];  // this warp's 16 rows x kDkvCols of dK / scale and dV
  zero(dk);
  zero(dv);
  // dQ work split: this warp's 16 query rows and kDqCols columns of each query tile.
  const int dq_row0 = 16 * (warp % Cfg::kDqStrips), dq_col0 = Cfg::kDqCols * (warp / Cfg::kDqStrips);

  for (int step = 0; step < n_steps; ++step) {
    const int stage = step % 2, query0 = step_m_tile(step) * kBlockM;
    const int batch_head = batch * p.heads + step_head(step);  // the query head: dropout, dQ
    if (step + 1 < n_steps) load_query_side(step + 1, stage ^ 1);  // released by the last iteration's sync
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // Sᵀ = K Qᵀ and dP̃ᵀ = V dOᵀ (16 keys x kBlockM queries): B(k = d, n = query) = Q(query, d).
    float st[kMTiles][4], dpt[kMTiles][4];
    zero(st);
    zero(dpt);
    if constexpr (Cfg::kTensorCores) {
      warp_gemm_tensor_cores<Element, kHeadDim>(st, row_major(k_tile, warp_key0, 0), transposed(q_tile(stage), 0, 0),
                                                head_dim);
      warp_gemm_tensor_cores<Element, kHeadDim>(dpt, row_major(v_tile, warp_key0, 0),
                                                transposed(do_tile(stage), 0, 0), head_dim);
    } else {
      warp_gemm_simt<kHeadDim>(st, row_major(k_tile, warp_key0, 0), transposed(q_tile(stage), 0, 0), head_dim);
      warp_gemm_simt<kHeadDim>(dpt, row_major(v_tile, warp_key0, 0), transposed(do_tile(stage), 0, 0), head_dim);
    }

    // Elementwise: st becomes P̃ᵀ, dpt becomes dSᵀ (column c of a tile is query query0 + c).
    const bool needs_mask = visible.tile_needs_mask(query0, kBlockM, key0, kBlockN);
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * n + 2 * t + e % 2, query = query0 + col, key = keys[e / 2];
        const float score = score_log2(p, st[n][e]);  // soft-capped, log2 units
        float prob = exp2f(score - lse2(stage)[col]);
        if (needs_mask && !visible(query, key)) prob = 0.0f;
        float dprob = dpt[n][e];
        float kept_prob = prob;
        if (p.dropout_p > 0.0f) {
          const bool keep = dropout_keeps(p, batch_head, query, key);
          kept_prob = keep ? prob * p.dropout_scale : 0.0f;
          dprob = keep ? dprob * p.dropout_scale : 0.0f;
        }
        st[n][e] = kept_prob;
        float ds = prob * (dprob - delta(stage)[col]);  // d loss / d capped score
        if (p.softcap > 0.0f) {  // d(c·tanh(s/c))/ds = 1 - tanh², tanh = capped / c
          const float capped_tanh = score / p.softcap_log2;
          ds *= 1.0f - capped_tanh * capped_tanh;
        }
        dpt[n][e] = ds;
      }
    }

    // dV += P̃ᵀ dO and dK += dSᵀ Q over the warp's columns: B(k = query, n = d) = dO(query, d) / Q(query, d).
    if constexpr (Cfg::kTensorCores) {
      const int dkv_cols = head_dim - dkv_col0;  // of the warp's columns, those inside the head dim
      warp_gemm_tensor_cores<Element, kBlockM>(dv, accumulators_as_a<Element>(st),
                                               row_major(do_tile(stage), 0, dkv_col0), kBlockM, dkv_cols);
      warp_gemm_tensor_cores<Element, kBlockM>(dk, accumulators_as_a<Element>(dpt),
                                               row_major(q_tile(stage), 0, dkv_col0), kBlockM, dkv_cols);
      // The warps of column half 0 (warp < kKeyStrips) write it; the other half holds the same dSᵀ.
      if (warp < Cfg::kKeyStrips) store_accumulators(ds_tile, warp_key0, 0, dpt);
    } else {
      const int strip0 = 16 * warp;  // the warp's own strip (= warp_key0 for column half 0)
      store_accumulators(pt_tile, strip0, 0, st);
      store_accumulators(ds_tile, strip0, 0, dpt);
      __syncwarp();
      warp_gemm_simt<kBlockM>(dv, row_major(pt_tile, strip0, 0), row_major(do_tile(stage), 0, dkv_col0));
      warp_gemm_simt<kBlockM>(dk, row_major(ds_tile, strip0, 0), row_major(q_tile(stage), 0, dkv_col0));
    }
    // dSᵀ is complete, and nobody reads this stage's Q, dO, lse, D any more: the next
    // iteration may refill it as soon as it starts.
    __syncthreads();

    // dQ += dS K: A(m = query, k = key) = dSᵀ(key, query), B(k = key, n = d) = K(key, d).
    float dq[kDqTiles][4];
    zero(dq);
    if constexpr (Cfg::kTensorCores) {
      warp_gemm_tensor_cores<Element, kBlockN>(dq, transposed(ds_tile, 0, dq_row0), row_major(k_tile, 0, dq_col0),
                                               kBlockN, head_dim - dq_col0);
    } else {
      warp_gemm_simt<kBlockN>(dq, transposed(ds_tile, 0, dq_row0), row_major(k_tile, 0, dq_col0));
    }
#pragma unroll
    for (int n = 0; n < kDqTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = query0 + dq_row0 + g + 8 * (e / 2), col = dq_col0 + 8 * n + 2 * t + e % 2;
        if (query < p.q_len && col < head_dim) {
          atomicAdd(p.grad_q_accum + (int64_t(batch_head) * p.q_len + query) * head_dim + col, dq[n][e]);
        }
      }
    }
    // ds_tile is rewritten only after the next iteration's __syncthreads: no sync here.
  }

  // Epilogue: dK = scale · Σ dSᵀ Q; both go out through the (now free) K and V tiles.
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] *= p.scale;
  }
  cp_async_wait<0>();  // K, V may still be in flight when no query tile was visited
  __syncthreads();     // every warp is done reading K (dQ reads all of it)
  store_accumulators(k_tile, warp_key0, dkv_col0, dk);
  store_accumulators(v_tile, warp_key0, dkv_col0, dv);
  __syncthreads();
  const int64_t out_offset = (int64_t(batch_kv_head) * p.k_len + key0) * head_dim;  // (B, Hkv, Tk, D)
  store_tile<kBlockN, kThreads>(k_tile, static_cast<Element*>(p.grad_k) + out_offset, p.k_len - key0, head_dim);
  store_tile<kBlockN, kThreads>(v_tile, static_cast<Element*>(p.grad_v) + out_offset, p.k_len - key0, head_dim);
}

// D_i = Σ_d dO[i, d] · O[i, d] over all B·H·Tq rows; kLanesPerRow lanes per row, each
// reading every kLanesPerRow-th 16-byte vector of the row's head_dim columns.
template <typename Element, int kHeadDim>
struct DeltaConfig {
  static constexpr int kVec = kVecElems<Element>;
  static constexpr int kLanesPerRow = kHeadDim / kVec < 32 ? kHeadDim / kVec : 32;  // a power of two <= 32
  static constexpr int kRowsPerBlock = 256 / kLanesPerRow;
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p) {
  using Cfg = DeltaConfig<Element, kHeadDim>;
  constexpr int kVec = Cfg::kVec, kLanesPerRow = Cfg::kLanesPerRow, kRowsPerBlock = Cfg::kRowsPerBlock;
  const int64_t total_rows = int64_t(p.batch) * p.heads * p.q_len;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanesPerRow;
  const int part = threadIdx.x % kLanesPerRow;
  float sum = 0.0f;
  if (row < total_rows) {
    const int64_t batch_head = row / p.q_len;
    const int query = int(row % p.q_len);
    const int batch = int(batch_head / p.heads), head = int(batch_head % p.heads);
    const Element* dout = offset_pointer<Element>(p.grad_out, batch, head, p.grad_out_batch_stride,
                                                  p.grad_out_head_stride) + query * p.grad_out_row_stride;
    const Element* out = static_cast<const Element*>(p.saved_out) + row * p.head_dim;
#pragma unroll
    for (int round = 0; round < kHeadDim / kVec / kLanesPerRow; ++round) {
      const int vec = part + round * kLanesPerRow;
      if (vec * kVec >= p.head_dim) break;
      float a[kVec], b[kVec];
      load_vector(dout + vec * kVec, a);
      load_vector(out + vec * kVec, b);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum = fmaf(a[i], b[i], sum);
    }
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullWarp, sum, offset);
  // d lse_i / d s_ij = P_ij, so a gradient of lse enters dS = P ∘ (dP - delta + grad_lse) through delta.
  if (part == 0 && row < total_rows) p.delta[row] = p.grad_lse != nullptr ? sum - p.grad_lse[row] : sum;
}

// dQ = scale · dQ_accum in the input dtype, 4 elements per thread and step.
template <typename Element>
__global__ void __launch_bounds__(256) attention_bwd_convert_dq_kernel(const AttentionParams p, int64_t n_quads) {
  Element* grad_q = static_cast<Element*>(p.grad_q);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_quads; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 x = reinterpret_cast<const float4*>(p.grad_q_accum)[i];
    grad_q[4 * i + 0] = from_float<Element>(x.x * p.scale);
    grad_q[4 * i + 1] = from_float<Element>(x.y * p.scale);
    grad_q[4 * i + 2] = from_float<Element>(x.z * p.scale);
    grad_q[4 * i + 3] = from_float<Element>(x.w * p.scale);
  }
}

template <typename Element, int kHeadDim>
void launch_attention_bwd(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = BwdConfig<Element, kHeadDim>;
  const int64_t rows = int64_t(params.batch) * params.heads * params.q_len;
  constexpr int kRowsPerDeltaBlock = DeltaConfig<Element, kHeadDim>::kRowsPerBlock;
  // Every grid is checked before the first launch: an error leaves nothing half done.
  const dim3 delta_grid = launch_grid("the attention backward's delta (rows of B * H * Tq)",
                                      (rows + kRowsPerDeltaBlock - 1) / kRowsPerDeltaBlock);
  const dim3 grid = launch_grid("the attention backward (B * Hkv, key tiles of 64)",
                                int64_t(params.batch) * params.kv_heads,
                                (int64_t(params.k_len) + Cfg::kBlockN - 1) / Cfg::kBlockN);
  const int64_t n_quads = rows * params.head_dim / 4;
  const int64_t blocks = (n_quads + 255) / 256;  // grid-stride: at most 65536 of them
  const dim3 convert_grid = launch_grid("the attention backward's dQ conversion", blocks < 65536 ? blocks : 65536);
  auto kernel = attention_bwd_kernel<Element, kHeadDim>;
  allow_shared_memory(kernel, Cfg::kSmemBytes, "the attention backward kernel");

  launch_kernel(attention_bwd_delta_kernel<Element, kHeadDim>, delta_grid, 256, 0, stream, params);
  launch_kernel(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, params);
  launch_kernel(attention_bwd_convert_dq_kernel<Element>, convert_grid, 256, 0, stream, params, n_quads);
}

}  // namespace fastgpt::cuda

// The whole of attention_bwd_<dtype>.cu: launch_attention_bwd<Element, W> for every kernel width
// of attention.h, one dtype per file so that the CUDA build is parallel and incremental.
#define FASTGPT_INSTANTIATE_ATTENTION_BWD_ONE(Element, D) \
  template void launch_attention_bwd<Element, D>(const AttentionParams&, cudaStream_t);
#define FASTGPT_INSTANTIATE_ATTENTION_BWD(Element) \
  namespace fastgpt::cuda { FASTGPT_ATTENTION_KERNEL_WIDTHS(FASTGPT_INSTANTIATE_ATTENTION_BWD_ONE, Element) }
