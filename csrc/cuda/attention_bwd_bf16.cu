// Attention backward kernels for __nv_bfloat16 (tensor cores), every supported head dim.
// One instantiation group per file so the CUDA build is parallel and incremental.
#include "cuda/attention_bwd.cuh"

namespace fastgpt::cuda {
template void launch_attention_bwd<__nv_bfloat16, 16>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__nv_bfloat16, 32>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__nv_bfloat16, 64>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__nv_bfloat16, 128>(const AttentionParams&, cudaStream_t);
}  // namespace fastgpt::cuda
