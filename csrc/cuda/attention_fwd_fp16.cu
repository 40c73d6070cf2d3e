// Attention forward kernels, float16, tensor cores (one dtype per file: see attention_fwd.cuh).
#include "cuda/attention_fwd.cuh"
FASTGPT_INSTANTIATE_ATTENTION_FWD(__half)
