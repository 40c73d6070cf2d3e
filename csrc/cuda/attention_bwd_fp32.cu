// Attention backward kernels for float (SIMT float32 path), every supported head dim.
// One instantiation group per file so the CUDA build is parallel and incremental.
#include "cuda/attention_bwd.cuh"

namespace fastgpt::cuda {
template void launch_attention_bwd<float, 16>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<float, 32>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<float, 64>(const AttentionParams&, cudaStream_t);
template void launch_attention_bwd<float, 128>(const AttentionParams&, cudaStream_t);
}  // namespace fastgpt::cuda
