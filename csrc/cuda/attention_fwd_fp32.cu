// Attention forward kernels for float (SIMT float32 path), every supported head dim.
// One instantiation group per file so the CUDA build is parallel and incremental.
#include "cuda/attention_fwd.cuh"

namespace fastgpt::cuda {
template void launch_attention_fwd<float, 16>(const AttentionParams&, cudaStream_t);
template void launch_attention_fwd<float, 32>(const AttentionParams&, cudaStream_t);
template void launch_attention_fwd<float, 64>(const AttentionParams&, cudaStream_t);
template void launch_attention_fwd<float, 128>(const AttentionParams&, cudaStream_t);
}  // namespace fastgpt::cuda
