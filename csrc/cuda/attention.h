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
  const void* saved_out;  // (B, H, Tq, D) contiguous
  const float* saved_lse; // (B, H, Tq)
  float* delta;           // (B, H, Tq) scratch: rowsum(grad_out * out)
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

}  // namespace fastgpt::cuda
