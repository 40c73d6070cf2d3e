// Attention decode (split-KV) kernels, float32 (one dtype per file: see attention_decode.cuh).
#include "cuda/attention_decode.cuh"
FASTGPT_INSTANTIATE_ATTENTION_DECODE(float)
