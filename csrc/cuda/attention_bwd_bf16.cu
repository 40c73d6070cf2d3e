// Attention backward kernels, bfloat16, tensor cores (one dtype per file: see attention_bwd.cuh).
#include "cuda/attention_bwd.cuh"
FASTGPT_INSTANTIATE_ATTENTION_BWD(__nv_bfloat16)
