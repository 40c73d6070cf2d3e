// Attention forward kernels, bfloat16, tensor cores (one dtype per file: see attention_fwd.cuh).
#include "cuda/attention_fwd.cuh"
FASTGPT_INSTANTIATE_ATTENTION_FWD(__nv_bfloat16)
