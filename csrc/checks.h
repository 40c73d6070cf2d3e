// Argument checks of the fastgpt:: operators (schemas: csrc/ops.cpp), shared by the CPU
// (csrc/cpu) and CUDA (csrc/cuda) kernels. fastgpt/ops.py validates the public API once,
// before any kernel runs; these are the safety nets of direct operator calls, in the same
// message format:  "fastgpt::<op>: <what> must be <expected>, got <actual>".
// What each backend supports (dtypes, head dims) is declared in fastgpt/backends.py and
// enforced where the kernels pick their instantiation (csrc/cpu/attention.cpp, csrc/cuda/host.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>

namespace fastgpt {

// Up to this many queries the attention forwards (CPU and CUDA) take their split-KV decode
// kernels; fastgpt.backends.DECODE_MAX_QUERIES says the same (fastgpt._C.decode_max_queries; tests check).
inline constexpr int64_t kDecodeMaxQueries = 16;

// q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) with Hq % Hkv == 0 in one dtype on one device;
// key_padding_mask bool (B, Tk) on that device or None; dropout_p in [0, 1); window >= 0 and
// softcap >= 0 (0: none).
inline void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                                   int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q (B, H, Tq, D), k and v (B, H, Tk, D) must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q and k, v must agree in B and D, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
              ": the query heads Hq must be a multiple of the key/value heads Hkv, got ", q.size(1), " and ",
              k.size(1));
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == k.size(0) &&
                    mask.size(1) == k.size(2),
                op, ": key_padding_mask must be bool (B, Tk) = (", k.size(0), ", ", k.size(2), "), got ",
                mask.scalar_type(), " ", mask.sizes());
    TORCH_CHECK(mask.device() == q.device(), op, ": key_padding_mask must be on ", q.device(),
                " (the device of q), got ", mask.device());
  }
}

// What a kernel does not implement yet (fastgpt/backends.py declares the same per backend, so
// the public API never gets here): grouped-query attention, sliding windows, logit softcap.
inline void check_attention_features(const char* op, const char* kernels, bool gqa, bool window, bool softcap,
                                     const at::Tensor& q, const at::Tensor& k, int64_t window_size,
                                     double softcap_value) {
  TORCH_CHECK(gqa || q.size(1) == k.size(1), op, ": grouped-query attention (Hq = ", q.size(1), ", Hkv = ",
              k.size(1), ") is not implemented in the ", kernels, " kernels");
  TORCH_CHECK(window || window_size == 0, op, ": a sliding window is not implemented in the ", kernels,
              " kernels, got window ", window_size);
  TORCH_CHECK(softcap || softcap_value == 0.0, op, ": a logit softcap is not implemented in the ", kernels,
              " kernels, got softcap ", softcap_value);
}

// The backward's saved tensors: grad_out and out (B, H, Tq, D) like q, lse and grad_lse (if any)
// float32 (B, H, Tq).
inline void check_attention_bwd_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       const std::optional<at::Tensor>& grad_lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have the shape of q ", q.sizes(), ", got ", grad_out.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have the dtype of q (", q.scalar_type(), "), got ", grad_out.scalar_type(),
              " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3), op,
              ": lse must be float32 (B, H, Tq), got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
              ": grad_out, out and lse must be on ", q.device(), " (the device of q), got ", grad_out.device(),
              ", ", out.device(), ", ", lse.device());
  if (grad_lse.has_value())
    TORCH_CHECK(grad_lse->scalar_type() == at::kFloat && grad_lse->sizes() == lse.sizes() &&
                    grad_lse->device() == q.device(),
                op, ": grad_lse must be float32 ", lse.sizes(), " on ", q.device(), " like lse, got ",
                grad_lse->scalar_type(), " ", grad_lse->sizes(), " on ", grad_lse->device());
}

// The saved statistics of layer norm and RMSNorm (mean, rstd (N,)): float32, float64 for float64 x.
inline at::ScalarType layer_norm_stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x (N, C) with C >= 1; each of `params` (weight, bias) (C,) in the dtype and on the device of x.
inline void check_layer_norm_inputs(const char* op, const at::Tensor& x,
                                    std::initializer_list<std::pair<const char*, const at::Tensor*>> params) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": x must be 2-D (N, C) with C >= 1, got ", x.sizes());
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (", x.size(1),
                ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must be ", x.scalar_type(),
                " (the dtype of x), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), " (the device of x), got ",
                t->device());
  }
}

// A norm's backward: grad_y like x; each of `stats` (mean, rstd) (N,) in layer_norm_stats_dtype(x)
// on x's device.
inline void check_norm_bwd_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                  std::initializer_list<std::pair<const char*, const at::Tensor*>> stats) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              op, ": grad_y must have the shape, dtype and device of x (", x.sizes(), ", ", x.scalar_type(), ", ",
              x.device(), "), got ", grad_y.sizes(), ", ", grad_y.scalar_type(), ", ", grad_y.device());
  const at::ScalarType stats_dtype = layer_norm_stats_dtype(x);
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0) && t->scalar_type() == stats_dtype &&
                    t->device() == x.device(),
                op, ": ", name, " must be (N,) = (", x.size(0), ",) in ", stats_dtype, " on ", x.device(), ", got ",
                t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
}

inline void check_layer_norm_bwd_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& rstd) {
  check_norm_bwd_inputs(op, grad_y, x, {{"mean", &mean}, {"rstd", &rstd}});
}

// A forward's eps: positive and finite.
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be positive and finite, got ", eps);
}

// RMSNorm: x (N, C) with C >= 1; weight (C,) or None, and the residual of add_rms_norm (N, C),
// in the dtype and on the device of x; offset finite.
inline void check_rms_norm_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  double offset, const at::Tensor* residual = nullptr) {
  if (weight.has_value()) {
    check_layer_norm_inputs(op, x, {{"weight", &*weight}});
  } else {
    check_layer_norm_inputs(op, x, {});
  }
  TORCH_CHECK(std::isfinite(offset), op, ": offset must be finite, got ", offset);
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                op, ": residual must have the shape, dtype and device of x (", x.sizes(), ", ", x.scalar_type(),
                ", ", x.device(), "), got ", residual->sizes(), ", ", residual->scalar_type(), ", ",
                residual->device());
  }
}

}  // namespace fastgpt
