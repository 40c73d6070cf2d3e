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

// The head dims the kernels are compiled for, the one list on the C++ side: X(Element, D) is
// expanded for each (fastgpt/backends.py declares the `cuda` backend's head dims; tests/test_cuda.py
// checks the two agree).
#define FASTGPT_ATTENTION_HEAD_DIMS(X, Element) X(Element, 16) X(Element, 32) X(Element, 64) X(Element, 128)

#define FASTGPT_ATTENTION_HEAD_DIM_ITEM(Element, D) D,
inline constexpr int kAttentionHeadDims[] = {FASTGPT_ATTENTION_HEAD_DIMS(FASTGPT_ATTENTION_HEAD_DIM_ITEM, )};
#undef FASTGPT_ATTENTION_HEAD_DIM_ITEM

// Defined in attention_{fwd,bwd}_<dtype>.cu for Element in {__half, __nv_bfloat16, float} and
// every head dim above (FASTGPT_INSTANTIATE_ATTENTION_FWD / _BWD). They launch on `stream` and never sync.
template <typename Element, int kHeadDim>
void launch_attention_fwd(const AttentionParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void launch_attention_bwd(const AttentionParams& params, cudaStream_t stream);

using AttentionLauncher = void (*)(const AttentionParams&, cudaStream_t);

// The instantiation for a runtime head dim; nullptr for one that is not compiled.
template <typename Element>
AttentionLauncher attention_launcher_for(bool forward, int64_t head_dim) {
#define FASTGPT_ATTENTION_LAUNCHER_CASE(Element, D) \
  case D: return forward ? launch_attention_fwd<Element, D> : launch_attention_bwd<Element, D>;
  switch (head_dim) {
    FASTGPT_ATTENTION_HEAD_DIMS(FASTGPT_ATTENTION_LAUNCHER_CASE, Element)
    default: return nullptr;
  }
#undef FASTGPT_ATTENTION_LAUNCHER_CASE
}

}  // namespace fastgpt::cuda
