// Attention backward kernels for __half (tensor cores), every supported head dim.
// One instantiation group per file so the CUDA build is parallel and incremental.
#include "cuda/attention_bwd.cuh"

namespace fastgpt::cuda {
template void launch_attention_bwd<__half, 16>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__half, 32>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__half, 64>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<__half, 128>(const AttentionParams&, cudaStream_t);
}  // namespace fastgpt::cuda
