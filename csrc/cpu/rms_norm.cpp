// RMSNorm over the rows of x, CPU kernels of fastgpt::rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd.
//
//   x, residual, sum, y, grad_y, grad_x  (N, C)   weight, grad_weight  (C,)   all in x's dtype
//   rstd                                 (N,)     acc_t: float32 (float64 when x is float64)
//
// Arithmetic runs in acc_t (at::opmath_type: float for float32/float16/bfloat16, double for
// float64) on at::vec::Vectorized<acc_t> blocks; half-precision rows are widened on load and
// rounded once on store. With s = offset + weight (offset = 1: Gemma's 1 + weight), or s = 1
// when there is no weight:
//
// Forward, per row (rows split across threads by at::parallel_for); a row of a few thousand
// elements stays in L1 between the two passes, so the second pass costs arithmetic, not memory:
//   pass 1  rstd = 1 / sqrt(Σx² / C + eps)       no mean to subtract, so no cancellation: Σx² is
//                                                a sum of positive terms, exact to acc_t rounding
//   pass 2  y = x · rstd · s
// add_rms_norm: pass 1 first forms h = x + residual, stores it as `sum` (rounded to x's dtype)
// and sums the squares of that rounded h, which pass 2 normalises: y = rms_norm(sum) exactly as
// the unfused `h = x + residual; rms_norm(h)`, and the backward needs only `sum`, not x and residual.
//
// Backward, per row, with x̂ = x · rstd and g = grad_y · s:
//   pass 1  Σg·x
//   pass 2  grad_x = rstd · (g - x̂ · mean(g·x̂)),  mean(g·x̂) = rstd · Σg·x / C
//           grad_weight += grad_y · x̂                (this chunk's partial sums)
// grad_weight is a sum over all N rows, taken per chunk of rows and then over the chunks in a
// fixed order (csrc/cpu/norm_rows.h): bitwise the same whatever at::get_num_threads() is.
// add_rms_norm's backward is this one on `sum` plus the residual path's gradient (added by the op
// contract, fastgpt/_registration.py).
//
// y, sum and grad_x are fresh tensors that ask for transparent huge pages; y and grad_x, written
// once in the last pass, use streaming stores from 16 MiB on (sum is read back in pass 2, so it
// stays in the cache); see csrc/cpu/norm_rows.h.

// No implicit fused multiply-adds, as in layer_norm.cpp: the helpers of norm_rows.h are compiled
// the same way in both kernel files, and results do not change with the compiler's contraction.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "norm_rows.h"

namespace fastgpt {
namespace {

// x, residual, sum, y (N, C) contiguous; weight (C,) or nullptr (s = 1); residual and sum both
// nullptr (rms_norm) or both set (add_rms_norm); rstd (N,).
template <typename scalar_t>
void rms_norm_fwd_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* weight, scalar_t* y,
                       scalar_t* sum, acc_t<scalar_t>* rstd_out, int64_t N, int64_t C, acc_t<scalar_t> eps,
                       acc_t<scalar_t> offset, bool stream_y) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec offset_vec(offset);
  parallel_rows(N, C, [&](int64_t row) {
    const scalar_t* x_row = x + row * C;  // (C,)
    scalar_t* y_row = y + row * C;        // (C,)
    const scalar_t* h_row = x_row;        // (C,) what is normalised: x, or the stored sum
    acc sum_squares;
    if (residual == nullptr) {
      sum_squares = horizontal_sum(sum_blocks<Vec>(C, Vec(0), [&](int64_t j, int64_t n) {
        const Vec v = load(x_row + j, n);
        return v * v;
      }));
    } else {
      scalar_t* sum_row = sum + row * C;  // (C,)
      const scalar_t* r_row = residual + row * C;
      h_row = sum_row;
      sum_squares = horizontal_sum(sum_blocks<Vec>(C, Vec(0), [&](int64_t j, int64_t n) {
        store(sum_row + j, load(x_row + j, n) + load(r_row + j, n), n);
        const Vec h = load(sum_row + j, n);  // the rounded sum, as the backward will see it
        return h * h;
      }));
    }
    const acc rstd = acc(1) / std::sqrt(sum_squares / C + eps);
    rstd_out[row] = rstd;
    const Vec rstd_vec(rstd);
    for_each_block<Vec>(C, [&](int64_t j, int64_t n) {
      const Vec x_hat = load(h_row + j, n) * rstd_vec;
      store_output(y_row + j, weight == nullptr ? x_hat : x_hat * (load(weight + j, n) + offset_vec), n, stream_y);
    });
  });
}

// grad_y, x, grad_x (N, C) contiguous; weight (C,) or nullptr (s = 1, no grad_weight); rstd (N,).
template <typename scalar_t>
void rms_norm_bwd_rows(const scalar_t* grad_y, int64_t dy_stride, const scalar_t* x, const scalar_t* weight,
                       const acc_t<scalar_t>* rstd, scalar_t* grad_x, scalar_t* grad_weight, int64_t N, int64_t C,
                       acc_t<scalar_t> offset, bool stream_dx) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  const Vec offset_vec(offset);
  const auto scaled = [&](const Vec& dy, int64_t j, int64_t n) {  // g = dy · s
    return weight == nullptr ? dy : dy * (load(weight + j, n) + offset_vec);
  };
  const auto row_fn = [&](int64_t row, acc* dw_part) {  // dw_part (C,), nullptr without weight
    const scalar_t* x_row = x + row * C;        // (C,)
    const scalar_t* dy_row = grad_y + row * dy_stride;  // (C,)
    scalar_t* dx_row = grad_x + row * C;        // (C,)
    const acc sum_gx = horizontal_sum(sum_blocks<Vec>(C, Vec(0), [&](int64_t j, int64_t n) {
      return scaled(load(dy_row + j, n), j, n) * load(x_row + j, n);
    }));
    const acc r = rstd[row];
    const Vec r_vec(r), mean_g_xhat_vec(r * sum_gx / C);
    for_each_block<Vec>(C, [&](int64_t j, int64_t n) {
      const Vec dy = load(dy_row + j, n);
      const Vec x_hat = load(x_row + j, n) * r_vec;
      store_output(dx_row + j, r_vec * (scaled(dy, j, n) - x_hat * mean_g_xhat_vec), n, stream_dx);
      if (dw_part != nullptr) at::vec::fmadd(dy, x_hat, Vec::loadu(dw_part + j, n)).store(dw_part + j, n);
    });
  };
  if (weight == nullptr) {
    rows_with_column_sums<scalar_t>(N, C, {}, row_fn);
  } else {
    rows_with_column_sums<scalar_t>(N, C, {grad_weight}, row_fn);
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps, double offset) {
  check_rms_norm_inputs("fastgpt::rms_norm_fwd", x, weight, offset);
  check_eps("fastgpt::rms_norm_fwd", eps);
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor x_rows = x.contiguous();
  const std::optional<at::Tensor> w = weight.has_value() ? std::optional(weight->contiguous()) : std::nullopt;
  at::Tensor y = with_huge_pages(at::empty_like(x_rows));                          // (N, C)
  at::Tensor rstd = at::empty({N}, x.options().dtype(layer_norm_stats_dtype(x)));  // (N,)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastgpt::rms_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    rms_norm_fwd_rows<scalar_t>(x_rows.const_data_ptr<scalar_t>(), nullptr,
                                w ? w->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), nullptr,
                                rstd.mutable_data_ptr<acc>(), N, C, static_cast<acc>(eps), static_cast<acc>(offset),
                                streams(y));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    double eps, double offset) {
  check_rms_norm_inputs("fastgpt::add_rms_norm_fwd", x, weight, offset, &residual);
  check_eps("fastgpt::add_rms_norm_fwd", eps);
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor x_rows = x.contiguous(), r_rows = residual.contiguous();
  const std::optional<at::Tensor> w = weight.has_value() ? std::optional(weight->contiguous()) : std::nullopt;
  at::Tensor y = with_huge_pages(at::empty_like(x_rows));                          // (N, C)
  at::Tensor sum = with_huge_pages(at::empty_like(x_rows));                        // (N, C)
  at::Tensor rstd = at::empty({N}, x.options().dtype(layer_norm_stats_dtype(x)));  // (N,)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastgpt::add_rms_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    rms_norm_fwd_rows<scalar_t>(x_rows.const_data_ptr<scalar_t>(), r_rows.const_data_ptr<scalar_t>(),
                                w ? w->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
                                sum.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc>(), N, C,
                                static_cast<acc>(eps), static_cast<acc>(offset), streams(y));
  });
  return {y, sum, rstd};
}

// grad_weight is (C,), or empty (0,) when there is no weight.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                    double offset) {
  check_rms_norm_inputs("fastgpt::rms_norm_bwd", x, weight, offset);
  check_norm_bwd_inputs("fastgpt::rms_norm_bwd", grad_y, x, {{"rstd", &rstd}});
  const int64_t N = x.size(0), C = x.size(1);
  const GradRows dy = grad_rows(grad_y);
  const at::Tensor x_rows = x.contiguous(), rstd_c = rstd.contiguous();
  const std::optional<at::Tensor> w = weight.has_value() ? std::optional(weight->contiguous()) : std::nullopt;
  at::Tensor grad_x = with_huge_pages(at::empty_like(x_rows));        // (N, C)
  at::Tensor grad_weight = at::empty({w ? C : 0}, x_rows.options());  // (C,) or (0,)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastgpt::rms_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    rms_norm_bwd_rows<scalar_t>(dy.rows.const_data_ptr<scalar_t>(), dy.row_stride, x_rows.const_data_ptr<scalar_t>(),
                                w ? w->const_data_ptr<scalar_t>() : nullptr, rstd_c.const_data_ptr<acc>(),
                                grad_x.mutable_data_ptr<scalar_t>(),
                                w ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr, N, C, static_cast<acc>(offset),
                                streams(grad_x));
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace fastgpt
