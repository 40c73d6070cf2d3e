// The operator schemas of fastgpt: one TORCH_LIBRARY block, the contract every
// backend implements. Per-device kernels register with TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (their argument checks: csrc/checks.h); autograd,
// fake (meta) implementations and the double-backward guard are registered from Python by
// the op contract (fastgpt/_registration.py), which the Triton operators share.
//
// Shapes (the book's layout):
//   q            (B, Hq, Tq, D)       k, v  (B, Hkv, Tk, D)      same dtype, Hq % Hkv == 0
//                query head h reads kv head h / (Hq / Hkv) (grouped-query attention)
//   key_padding_mask  bool (B, Tk), true = keep, or None
//   out          (B, H, Tq, D)  dtype of q
//   lse          (B, H, Tq)     float32 log-sum-exp of the scaled, masked scores
//                               (-inf for a row with no visible key)
//   grad_lse     (B, H, Tq)     float32 gradient of lse, or None (attention(return_lse=True))
//   causal is bottom-right aligned: query i (at p = i + Tk - Tq) sees key j iff j <= p.
//   window W > 0 keeps p - W < j (causal) or |j - p| < W (non-causal); 0 = no window.
//   softcap c > 0 turns scores s into c * tanh(s / c) before masking; 0 = none.
//   Dropout keeps P[b,h,i,j] iff philox_uniform(seed, b*H+h, i*Tk+j) >= dropout_p
//   (see csrc/philox.h), and scales kept weights by 1 / (1 - dropout_p).
//
//   x            (N, C) contiguous rows     weight, bias (C,)
//   y            (N, C) dtype of x          mean, rstd (N,) float32 (float64 when x is)
//
//   RMSNorm: y = x * rstd * (offset + weight), rstd = 1 / sqrt(mean(x^2) + eps) over each row;
//   offset 1 is Gemma's (1 + weight); weight None: y = x * rstd (no scale, whatever offset).
//   x, residual  (N, C)      weight (C,) or None      y, sum (N, C) dtype of x
//   rstd         (N,) float32 (float64 when x is)
//   add_rms_norm_fwd: sum = x + residual (rounded to x's dtype), y = rms_norm(sum); its backward
//   is rms_norm_bwd on sum (the op contract adds the gradient of sum).
//   rms_norm_bwd's grad_weight is (C,), or empty (0,) when weight is None.
#include <torch/library.h>
#include <Python.h>

#include "checks.h"

TORCH_LIBRARY(fastgpt, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
        "float scale, float dropout_p, int seed, int window, float softcap) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, bool causal, float scale, float dropout_p, int seed, int window, "
        "float softcap, Tensor? grad_lse=None) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps, float offset) -> (Tensor y, Tensor rstd)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps, float offset) "
        "-> (Tensor y, Tensor sum, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, float offset) "
        "-> (Tensor grad_x, Tensor grad_weight)");
}

// `import fastgpt._C` loads this library (and with it the registrations above).
// The module records the torch it was built against (checked at import: fastgpt/_extension.py).
static PyModuleDef fastgpt_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastgpt_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FASTGPT_TORCH_VERSION);
  PyModule_AddIntConstant(m, "decode_max_queries", static_cast<long>(fastgpt::kDecodeMaxQueries));
  return m;
}
