// Attention decode (split-KV) kernels, float16 (one dtype per file: see attention_decode.cuh).
#include "cuda/attention_decode.cuh"
FASTGPT_INSTANTIATE_ATTENTION_DECODE(__half)
