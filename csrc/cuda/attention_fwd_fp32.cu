// Attention forward kernels, float32, SIMT (one dtype per file: see attention_fwd.cuh).
#include "cuda/attention_fwd.cuh"
FASTGPT_INSTANTIATE_ATTENTION_FWD(float)
