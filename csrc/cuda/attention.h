// The interface between the host wrappers (attention.cu, which know torch) and the
// attention kernels (attention_*.cuh, instantiated one group per .cu file, which know
// nothing about torch or Python).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastgpt::cuda {

// Strides are in elements; the last dimension (D) of every tensor is contiguous, rows
// start on 16-byte boundaries (the host wrapper copies tensors that are not).
struct AttentionParams {
  const void* q;  // (B, H, Tq, D)
  const void* k;  // (B, Hkv, Tk, D)
  const void* v;  // (B, Hkv, Tk, D)
  int head_dim;   // D <= the kernel's width kHeadDim (attention.h: widths)
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  const bool* key_padding_mask;  // (B, Tk) contiguous, true = keep; nullptr: every key visible
  int batch, heads, q_len, k_len;  // heads: the query heads Hq
  int kv_heads, kv_group;          // Hkv and Hq / Hkv: query head h reads kv head h / kv_group
  bool causal;                    // bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq)
  int window;                     // > 0: with p = i + (Tk - Tq), causal p - W < j, else |j - p| < W
  float softcap;                  // > 0: natural scores s -> softcap * tanh(s / softcap), before masking
  float softcap_log2;             // softcap * log2(e): the capped score in log2 units
  float scale_over_softcap;       // scale / softcap: q·k -> the tanh argument
  float scale;                    // scores are scale * q·k
  float scale_log2;               // scale * log2(e): the kernels work with exp2
  float dropout_p;                // 0: no dropout
  float dropout_scale;            // 1 / (1 - dropout_p)
  uint32_t seed;                  // Philox key word 0 (csrc/philox.h); word 1 is b * Hq + h (the query head)

  // forward outputs
  void* out;   // (B, H, Tq, D) contiguous, dtype of q
  float* lse;  // (B, H, Tq) contiguous, natural log; -inf for rows that see no key

  // backward (the forward's out and lse are inputs then)
  const void* grad_out;  // (B, H, Tq, D)
  int64_t grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride;
  const void* saved_out;  // (B, H, Tq, D) contiguous, 16-byte aligned (host.h: contiguous_aligned)
  const float* saved_lse; // (B, H, Tq)
  const float* grad_lse;  // (B, H, Tq) or null: the gradient of the returned lse (return_lse=True)
  float* delta;           // (B, H, Tq) scratch: rowsum(grad_out * out) - grad_lse
  float* grad_q_accum;    // (B, H, Tq, D) float32 scratch, zero-initialised
  void* grad_q;           // (B, H, Tq, D) contiguous
  void* grad_k;           // (B, Hkv, Tk, D) contiguous, summed over each kv head's query group
  void* grad_v;           // (B, Hkv, Tk, D) contiguous
};

// The head dims the `cuda` backend supports, the one list on the C++ side (fastgpt/backends.py
// declares the same for `cuda`; tests/test_cuda.py checks the two agree).
inline constexpr int kAttentionHeadDims[] = {16, 32, 64, 80, 96, 128, 256};

// The kernel widths compiled, X(Element, W) expanded for each: a head dim D runs on the narrowest
// width W >= D, with AttentionParams::head_dim = D. The kernels' shared-memory tiles need rows of a
// power-of-two count of 16-byte chunks (warp_mma.cuh), so 80 and 96 run on the 128-wide kernels:
// their loads zero-fill the columns >= D (which add nothing to Q Kᵀ and give zero output columns),
// their stores write only the columns < D, and the GEMM steps over those columns are skipped at run
// time (attention_fwd.cuh). A width per head dim would cost a template instantiation per dtype and direction each.
#define FASTGPT_ATTENTION_KERNEL_WIDTHS(X, Element) \
  X(Element, 16) X(Element, 32) X(Element, 64) X(Element, 128) X(Element, 256)

// Defined in attention_{fwd,bwd}_<dtype>.cu for Element in {__half, __nv_bfloat16, float} and
// every width above (FASTGPT_INSTANTIATE_ATTENTION_FWD / _BWD). They launch on `stream` and never sync.
template <typename Element, int kHeadDim>
void launch_attention_fwd(const AttentionParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_attention_bwd(const AttentionParams& params, cudaStream_t stream);

using AttentionLauncher = void (*)(const AttentionParams&, cudaStream_t);

// ---- split-KV decode (attention_decode.cuh)

// Forward calls with at most this many queries per head (decoding against a KV cache) take the
// split-KV decode kernels instead of the prefill kernel: a prefill block of 64-128 query rows
// would be mostly empty, and one block per (batch, head) cannot fill the GPU at long Tk. Must equal
// fastgpt.backends.DECODE_MAX_QUERIES (tests/test_cuda.py checks it through the emulator).
inline constexpr int kDecodeMaxQueries = 16;
// Query rows (a kv head's query heads x its Tq queries) one decode block holds in registers.
inline constexpr int kDecodeRowsPerBlock = 8;
// The split heuristic (plan_attention_decode): chunks of at least kDecodeMinChunk keys, enough
// blocks for kDecodeBlocksPerSm per SM, at most kDecodeMaxSplits chunks (the merge's loop).
inline constexpr int kDecodeMinChunk = 256;
inline constexpr int kDecodeBlocksPerSm = 4;
inline constexpr int kDecodeMaxSplits = 128;

// How a decode forward is split, and its float32 workspace (allocated by the caller).
struct DecodeSplits {
  int num_splits;      // key chunks attended in parallel (grid.y); 1: the decode kernel writes out, lse itself
  int chunk;           // keys per chunk (the last one may be shorter)
  int row_blocks;      // blocks of kDecodeRowsPerBlock rows per kv head (grid.z), rows = kv_group * Tq
  float* partial_out;  // (num_splits, B, Hq, Tq, D) each chunk's normalised output; nullptr with one split
  float* partial_lse;  // (num_splits, B, Hq, Tq) each chunk's log-sum-exp in log2 units, -inf: no key seen
};

// Keys [*begin, *end) hold every key that some query of the call may see (the causal and window
// bounds of Visibility, attention_common.cuh, over all Tq queries): the span the chunks cover.
__host__ __device__ inline void decode_key_range(const AttentionParams& p, int* begin, int* end) {
  const int64_t offset = int64_t(p.k_len) - p.q_len, last = p.q_len - 1 + offset;
  const int64_t first = p.window > 0 ? offset - p.window + 1 : 0;
  const int64_t stop = p.causal ? last + 1 : (p.window > 0 ? last + p.window : int64_t(p.k_len));
  *begin = int(first < 0 ? 0 : first);
  *end = int(stop < 0 ? 0 : (stop > p.k_len ? int64_t(p.k_len) : stop));
}

// The split of a decode forward (workspace pointers left null). `chunk` > 0 forces the chunk
// size (the emulator tests use it for several chunks at small Tk); 0 picks it from the GPU's
// `sm_count`: as many chunks as fill kDecodeBlocksPerSm blocks per SM (counting B * Hkv * row
// blocks), none shorter than kDecodeMinChunk keys, at most kDecodeMaxSplits.
inline DecodeSplits plan_attention_decode(const AttentionParams& p, int sm_count, int chunk = 0) {
  DecodeSplits s{};
  const int64_t rows = int64_t(p.kv_group) * p.q_len;
  s.row_blocks = int((rows + kDecodeRowsPerBlock - 1) / kDecodeRowsPerBlock);
  int key_begin = 0, key_end = 0;
  decode_key_range(p, &key_begin, &key_end);
  const int64_t keys = key_end > key_begin ? key_end - key_begin : 0;
  if (chunk <= 0) {
    int64_t blocks = int64_t(p.batch) * p.kv_heads * s.row_blocks;
    blocks = blocks > 0 ? blocks : 1;  // an empty call (the wrappers return before launching)
    const int64_t wanted = (int64_t(kDecodeBlocksPerSm) * (sm_count > 0 ? sm_count : 1) + blocks - 1) / blocks;
    int64_t splits = keys / kDecodeMinChunk;  // rounded down: no chunk below kDecodeMinChunk
    splits = splits < wanted ? splits : wanted;
    splits = splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits;
    splits = splits > 1 ? splits : 1;
    // ceil(keys / splits) keys each: exactly `splits` chunks (splits² <= keys), the last one shorter.
    const int64_t per_split = (keys + splits - 1) / splits;
    chunk = int(per_split > 0 ? per_split : 1);
  }
  s.chunk = chunk;
  const int64_t splits = (keys + chunk - 1) / chunk;
  s.num_splits = int(splits > 1 ? splits : 1);
  return s;
}

// Defined in attention_decode_<dtype>.cu (FASTGPT_INSTANTIATE_ATTENTION_DECODE) for every kernel
// width: the decode kernel over grid (B * Hkv, num_splits, row_blocks), then, with several splits,
// the merge kernel. They launch on `stream` and never sync.
template <typename Element, int kHeadDim>
void launch_attention_decode(const AttentionParams& params, const DecodeSplits& splits, cudaStream_t stream);

using AttentionDecodeLauncher = void (*)(const AttentionParams&, const DecodeSplits&, cudaStream_t);

// The kernels for a runtime head dim (they read it from AttentionParams::head_dim); nullptr for
// one that is not supported.
template <typename Element>
AttentionLauncher attention_launcher_for(bool forward, int64_t head_dim) {
  bool supported = false;
  for (const int d : kAttentionHeadDims) supported = supported || d == head_dim;
  if (!supported) return nullptr;
#define FASTGPT_ATTENTION_LAUNCHER_CASE(Element, W) \
  if (head_dim <= W) return forward ? launch_attention_fwd<Element, W> : launch_attention_bwd<Element, W>;
  FASTGPT_ATTENTION_KERNEL_WIDTHS(FASTGPT_ATTENTION_LAUNCHER_CASE, Element)
#undef FASTGPT_ATTENTION_LAUNCHER_CASE
  return nullptr;
}


// The decode kernels for a runtime head dim; nullptr for one that is not supported.
template <typename Element>
AttentionDecodeLauncher attention_decode_launcher_for(int64_t head_dim) {
  bool supported = false;
  for (const int d : kAttentionHeadDims) supported = supported || d == head_dim;
  if (!supported) return nullptr;
#define FASTGPT_ATTENTION_DECODE_LAUNCHER_CASE(Element, W) \
  if (head_dim <= W) return launch_attention_decode<Element, W>;
  FASTGPT_ATTENTION_KERNEL_WIDTHS(FASTGPT_ATTENTION_DECODE_LAUNCHER_CASE, Element)
#undef FASTGPT_ATTENTION_DECODE_LAUNCHER_CASE
  return nullptr;
}

}  // namespace fastgpt::cuda
