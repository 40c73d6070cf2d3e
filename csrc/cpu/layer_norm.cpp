// Layer norm over the rows of x, CPU kernels of fastgpt::layer_norm_fwd / layer_norm_bwd.
//
//   x, y, grad_y, grad_x  (N, C)   weight, bias, grad_weight, grad_bias  (C,)   all in x's dtype
//   mean, rstd            (N,)     acc_t: float32 (float64 when x is float64)
//
// Arithmetic runs in acc_t (at::opmath_type: float for float32/float16/bfloat16, double for
// float64) on at::vec::Vectorized<acc_t> blocks; half-precision rows are widened on load and
// rounded once on store.
//
// Forward, per row (rows split across threads by at::parallel_for); a row of a few thousand
// elements stays in L1 across the passes, so each extra pass costs arithmetic, not memory:
//   pass 1  m     = Σx / C                        a first estimate of the mean
//   pass 2  d     = x - m;  c = Σd / C            corrected two-pass statistics: d is small,
//           mean  = m + c                         so Σd² has no cancellation (E[x²] - E[x]²
//           var   = Σd² / C - c²                  loses everything when |mean| >> std), and c
//           rstd  = 1 / sqrt(var + eps)           repairs the rounding of m
//   pass 3  y     = ((x - m) - c) · rstd · w + b  x - m is (nearly) exact, so y does not inherit
//                                                 the rounding of mean to acc_t (ulp(1e3) in float32
//                                                 is 6e-5, far above float32 accuracy for y)
// Backward, per row, with x̂ = (x - mean) · rstd and g = grad_y · w:
//   pass 1  Σg, Σg·d, Σd with d = x - mean_saved  Σd/C corrects the saved (rounded) mean as above
//   pass 2  grad_x = rstd · (g - mean(g) - x̂ · mean(g·x̂))
//           grad_weight += grad_y · x̂,  grad_bias += grad_y    (this chunk's partial sums)
// grad_weight and grad_bias are sums over all N rows, taken per chunk of rows and then over the
// chunks in a fixed order (csrc/cpu/norm_rows.h): bitwise the same whatever at::get_num_threads() is.
//
// Both passes are memory bound, and so is what the memory system does around them: y and grad_x
// are fresh tensors, which ask for transparent huge pages (a first touch faults once per 2 MiB,
// not per 4 KiB) and, from 16 MiB on, are written with streaming stores (no read of each line
// before it is overwritten); see csrc/cpu/norm_rows.h.

// No implicit fused multiply-adds (GCC and clang contract a * b + c by default): where the
// backward subtracts mean(g) from g, both must be the same rounded products, or a row of C = 1
// (x̂ = 0, rstd = 1/sqrt(eps)) gets rstd · (fma rounding error) instead of an exact zero. FMAs
// are written explicitly (at::vec::fmadd) where they are wanted. Before the includes, so that
// every function of this file, ATen's inline vector code included, is compiled the same way.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "checks.h"
#include "norm_rows.h"

namespace fastgpt {
namespace {

template <typename scalar_t>
void layer_norm_fwd_rows(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* y,
                         acc_t<scalar_t>* mean_out, acc_t<scalar_t>* rstd_out, int64_t N, int64_t C,
                         acc_t<scalar_t> eps, bool stream_y) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  parallel_rows(N, C, [&](int64_t row) {
    const scalar_t* x_row = x + row * C;  // (C,)
    scalar_t* y_row = y + row * C;        // (C,)
    const acc m = horizontal_sum(sum_blocks<Vec>(C, Vec(0), [&](int64_t j, int64_t n) {
                    return load(x_row + j, n);
                  })) / C;
    const Vec m_vec(m);
    // v[0] = Σd, v[1] = Σd² with d = x - m; lanes past the row's end are masked to zero.
    const auto d_sums = sum_blocks<Vec>(C, Sums<Vec, 2>::zero(), [&](int64_t j, int64_t n) {
      Vec d = load(x_row + j, n) - m_vec;
      if (n < Vec::size()) d = Vec::set(Vec(0), d, n);
      return Sums<Vec, 2>{{d, d * d}};
    });
    const acc c = horizontal_sum(d_sums.v[0]) / C;
    const acc var = std::max(horizontal_sum(d_sums.v[1]) / C - c * c, acc(0));
    const acc rstd = acc(1) / std::sqrt(var + eps);
    mean_out[row] = m + c;
    rstd_out[row] = rstd;
    const Vec c_vec(c), rstd_vec(rstd);
    // x - m first: exact when x and m are close, so the large common offset cancels before
    // the small correction c is taken off.
    for_each_block<Vec>(C, [&](int64_t j, int64_t n) {
      const Vec x_hat = ((load(x_row + j, n) - m_vec) - c_vec) * rstd_vec;
      store_output(y_row + j, at::vec::fmadd(x_hat, load(weight + j, n), load(bias + j, n)), n, stream_y);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  check_layer_norm_inputs("fastgpt::layer_norm_fwd", x, {{"weight", &weight}, {"bias", &bias}});
  TORCH_CHECK(eps > 0, "fastgpt::layer_norm_fwd: eps must be positive, got ", eps);
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor x_rows = x.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  at::Tensor y = with_huge_pages(at::empty_like(x_rows));  // (N, C)
  at::Tensor mean = at::empty({N}, x.options().dtype(layer_norm_stats_dtype(x)));  // (N,)
  at::Tensor rstd = at::empty({N}, x.options().dtype(layer_norm_stats_dtype(x)));  // (N,)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastgpt::layer_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    layer_norm_fwd_rows<scalar_t>(x_rows.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                  b.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  mean.mutable_data_ptr<acc>(), rstd.mutable_data_ptr<acc>(), N, C,
                                  static_cast<acc>(eps), streams(y));
  });
  return {y, mean, rstd};
}

// grad_y row r at grad_y + r * dy_stride (norm_rows.h: grad_rows); the other matrices contiguous.
template <typename scalar_t>
void layer_norm_bwd_rows(const scalar_t* grad_y, int64_t dy_stride, const scalar_t* x, const scalar_t* weight,
                         const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd, scalar_t* grad_x,
                         scalar_t* grad_weight, scalar_t* grad_bias, int64_t N, int64_t C, bool stream_dx) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  // Each row adds dy · x̂ and dy into its chunk's partial (2, C): grad_weight, then grad_bias.
  rows_with_column_sums<scalar_t>(N, C, {grad_weight, grad_bias}, [&](int64_t row, acc* partial) {
    acc* dw_part = partial;      // (C,)
    acc* db_part = partial + C;  // (C,)
    const scalar_t* x_row = x + row * C;        // (C,)
    const scalar_t* dy_row = grad_y + row * dy_stride;  // (C,)
    scalar_t* dx_row = grad_x + row * C;        // (C,)
    const Vec mean_vec(mean[row]);
    // v[0] = Σg, v[1] = Σg·d, v[2] = Σd with g = dy·w, d = x - mean_saved (zero past the row's end).
    const auto sums = sum_blocks<Vec>(C, Sums<Vec, 3>::zero(), [&](int64_t j, int64_t n) {
      const Vec g = load(dy_row + j, n) * load(weight + j, n);
      Vec d = load(x_row + j, n) - mean_vec;
      if (n < Vec::size()) d = Vec::set(Vec(0), d, n);
      return Sums<Vec, 3>{{g, g * d, d}};
    });
    const acc r = rstd[row];
    const acc c = horizontal_sum(sums.v[2]) / C;  // mean - mean_saved
    const acc sum_g = horizontal_sum(sums.v[0]);
    const acc mean_g = sum_g / C;
    const acc mean_g_xhat = r * (horizontal_sum(sums.v[1]) - c * sum_g) / C;
    const Vec r_vec(r), c_vec(c), mean_g_vec(mean_g), mean_g_xhat_vec(mean_g_xhat);
    for_each_block<Vec>(C, [&](int64_t j, int64_t n) {
      const Vec dy = load(dy_row + j, n);
      const Vec x_hat = ((load(x_row + j, n) - mean_vec) - c_vec) * r_vec;
      const Vec g = dy * load(weight + j, n);
      store_output(dx_row + j, r_vec * (g - mean_g_vec - x_hat * mean_g_xhat_vec), n, stream_dx);
      at::vec::fmadd(dy, x_hat, Vec::loadu(dw_part + j, n)).store(dw_part + j, n);
      (Vec::loadu(db_part + j, n) + dy).store(db_part + j, n);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& weight, const at::Tensor& mean,
                                                                  const at::Tensor& rstd) {
  check_layer_norm_inputs("fastgpt::layer_norm_bwd", x, {{"weight", &weight}});
  check_layer_norm_bwd_inputs("fastgpt::layer_norm_bwd", grad_y, x, mean, rstd);
  const int64_t N = x.size(0), C = x.size(1);
  const GradRows dy = grad_rows(grad_y);
  const at::Tensor x_rows = x.contiguous(), w = weight.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor grad_x = with_huge_pages(at::empty_like(x_rows));  // (N, C)
  at::Tensor grad_weight = at::empty_like(w);  // (C,)
  at::Tensor grad_bias = at::empty_like(w);    // (C,)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastgpt::layer_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    layer_norm_bwd_rows<scalar_t>(dy.rows.const_data_ptr<scalar_t>(), dy.row_stride, x_rows.const_data_ptr<scalar_t>(),
                                  w.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc>(),
                                  rstd_c.const_data_ptr<acc>(), grad_x.mutable_data_ptr<scalar_t>(),
                                  grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(),
                                  N, C, streams(grad_x));
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastgpt
