// Attention backward kernels, float32, SIMT (one dtype per file: see attention_bwd.cuh).
#include "cuda/attention_bwd.cuh"
FASTGPT_INSTANTIATE_ATTENTION_BWD(float)
