// Attention decode (split-KV) kernels, bfloat16 (one dtype per file: see attention_decode.cuh).
#include "cuda/attention_decode.cuh"
FASTGPT_INSTANTIATE_ATTENTION_DECODE(__nv_bfloat16)
