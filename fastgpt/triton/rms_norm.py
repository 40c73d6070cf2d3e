"""RMSNorm in Triton: the fused forward (alone or after the residual add) and backward of the
`triton` backend.

With s = offset + w (offset = 1: Gemma's 1 + w), or s = 1 without a weight:

Forward: one program normalises BLOCK_R whole rows held in registers (BLOCK_C = the next power
of two >= C columns), as the layer norm kernels do (fastgpt/triton/layer_norm.py):
  rstd = 1 / sqrt(Σx² / C + eps)        a sum of squares: no mean, so no cancellation to repair
  y    = x · rstd · s
The fused add (HAS_RESIDUAL) first forms h = x + residual, stores it as `sum` rounded to x's
dtype and normalises that rounded h: the same numbers as `h = x + residual; rms_norm(h)`, and
the backward needs only `sum`. rstd (float32) is saved for the backward.

Backward, with x̂ = x · rstd and g = s · dy:
  dx = rstd · (g - x̂ · mean_c(g · x̂))     (per row)
  dw = Σ_rows dy · x̂                      (per column)
dw is reduced as layer norm's dweight is: rows are cut into groups of `rows_per_group`
consecutive rows (row_groups, 4 groups per SM); one program per group computes dx for its rows
and keeps its partial dw in registers, written once to a (num_groups, C) float32 buffer, which
is then summed over groups (a fixed-order reduction: no atomics). add_rms_norm's backward is
this one on `sum`, plus the gradient of `sum` (the op contract, fastgpt/_registration.py).

Launch configurations, their pruning and the interpreter config are layer norm's (same row-in-
registers structure); the autotuning key is C and the two feature flags.
Inputs may have any strides (x, residual are (N, C) views); y, sum, dx are contiguous (N, C).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _registration
from . import _launch
from .layer_norm import (BWD_CONFIGS, FWD_CONFIGS, INTERPRETER_CONFIG, _block_c, _prune_to_width, int32_columns,
                         row_groups)


@_launch.autotune(FWD_CONFIGS, INTERPRETER_CONFIG, key=["C", "HAS_RESIDUAL", "HAS_WEIGHT"], prune=_prune_to_width)
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, sum_ptr, rstd_ptr,
                         stride_xn, stride_xc, stride_rn, stride_rc, stride_w, N, C, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # x, residual (N, C) any strides; w (C,) any stride; y, sum (N, C) contiguous; rstd (N,) float32.
    # Without HAS_RESIDUAL / HAS_WEIGHT, r_ptr, sum_ptr / w_ptr are unused. Grid (cdiv(N, BLOCK_R),).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows64 * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64 * stride_rn + cols[None, :] * stride_rc, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(sum_ptr.dtype.element_ty)  # (BLOCK_R, BLOCK_C), rounded as it is stored
        tl.store(sum_ptr + rows64 * C + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / C + eps)  # (BLOCK_R,)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
        y = y * (offset + w)[None, :]
    tl.store(y_ptr + rows64 * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@_launch.autotune(BWD_CONFIGS, INTERPRETER_CONFIG, key=["C", "HAS_WEIGHT"], prune=_prune_to_width)
@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         stride_dyn, stride_dyc, stride_xn, stride_xc, stride_w, N, C, rows_per_group, offset,
                         HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # dy, x (N, C), w (C,) any strides; rstd (N,) float32; dx (N, C) contiguous;
    # dw_partial (num_groups, C) float32 (unused without HAS_WEIGHT). Grid (num_groups,).
    group = tl.program_id(0)
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, N)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_WEIGHT:
        scale = offset + tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)  # reduced over rows once, after the loop
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dyn + cols[None, :] * stride_dyc, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]  # (BLOCK_R, BLOCK_C), 0 outside the mask as x is
        if HAS_WEIGHT:
            g = dy * scale[None, :]
            dw_acc += dy * x_hat
        else:
            g = dy
        mean_g_x_hat = tl.sum(g * x_hat, 1) / C
        dx = (g - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + group * C + cols, tl.sum(dw_acc, 0), mask=col_ok)


# ----------------------------------------------------------------------------- host side

def _check_inputs(op: str, x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    _launch.check_capabilities(op, "rms_norm", x)
    C = x.shape[1]
    torch._check(weight is None or weight.shape == (C,),
                 lambda: f"fastgpt::{op}: weight must have shape (C,) = ({C},) or be None, got {tuple(weight.shape)}")


def _forward(op: str, x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, sum, rstd) of x (N, C) (+ residual); sum is x itself without a residual."""
    N, C = x.shape
    _check_inputs(op, x, weight)
    torch._check(residual is None or residual.shape == (N, C),
                 lambda: f"fastgpt::{op}: residual must have the shape of x ({N}, {C}), got {tuple(residual.shape)}")
    x, residual, weight = int32_columns(C, x, residual, weight)
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)  # (N, C)
    total = torch.empty((N, C), dtype=x.dtype, device=x.device) if residual is not None else x  # (N, C)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)  # (N,)
    r = residual if residual is not None else x
    with _launch.device_guard(x):
        _rms_norm_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_R"]),)](
            x, r, weight if weight is not None else x, y, total, rstd, *x.stride(), *r.stride(),
            weight.stride(0) if weight is not None else 0, N, C, eps, offset,
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, BLOCK_C=_block_c(op, C))
    return y, total, rstd


@torch.library.custom_op("fastgpt::triton_rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                 offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C), weight (C,) or None, any strides -> y (N, C) contiguous in x's dtype, rstd (N,) float32."""
    y, _, rstd = _forward("triton_rms_norm_fwd", x, None, weight, eps, offset)
    return y, rstd


@torch.library.custom_op("fastgpt::triton_add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                     offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (N, C), weight (C,) or None, any strides -> y, sum = x + residual (N, C)
    contiguous in x's dtype, rstd (N,) float32."""
    return _forward("triton_add_rms_norm_fwd", x, residual, weight, eps, offset)


@torch.library.custom_op("fastgpt::triton_rms_norm_bwd", mutates_args=())
def rms_norm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                 offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_y, x (N, C) any strides, weight (C,) or None, rstd (N,) float32 from the forward
    -> grad_x (N, C) contiguous, grad_weight (C,) in weight's dtype (empty (0,) without weight)."""
    N, C = x.shape
    op = "triton_rms_norm_bwd"
    _check_inputs(op, x, weight)
    torch._check(grad_y.shape == (N, C), lambda: f"fastgpt::{op}: grad_y must be (N, C) = ({N}, {C}), "
                                                 f"got {tuple(grad_y.shape)}")
    torch._check(rstd.shape == (N,) and rstd.dtype == torch.float32 and rstd.is_contiguous(),
                 lambda: f"fastgpt::{op}: rstd must be contiguous float32 (N,) = ({N},), "
                         f"got {rstd.dtype} {tuple(rstd.shape)}")
    grad_y, x, weight = int32_columns(C, grad_y, x, weight)
    rows_per_group, num_groups = row_groups(N, x.device)
    grad_x = torch.empty((N, C), dtype=x.dtype, device=x.device)  # (N, C)
    has_weight = weight is not None
    # (num_groups, C); without a weight nothing is written there, grad_x stands in as the pointer
    dw_partial = torch.empty((num_groups, C), dtype=torch.float32, device=x.device) if has_weight else grad_x
    with _launch.device_guard(x):
        _rms_norm_bwd_kernel[(num_groups,)](
            grad_y, x, weight if has_weight else x, rstd, grad_x, dw_partial, *grad_y.stride(), *x.stride(),
            weight.stride(0) if has_weight else 0, N, C, rows_per_group, offset,
            HAS_WEIGHT=has_weight, BLOCK_C=_block_c(op, C))
    grad_weight = dw_partial.sum(0).to(weight.dtype) if has_weight else x.new_empty((0,))  # (C,) or (0,)
    return grad_x, grad_weight


_registration.register("rms_norm", impl="triton_")  # fake impls, autograd, double-backward guard
_registration.register("add_rms_norm", impl="triton_")


def rms_norm(x, weight, eps, offset):
    """The `triton` backend's RMSNorm: x (N, C) rows, weight (C,) in x's dtype or None -> (N, C).
    Inputs are validated by fastgpt.ops; differentiable in x and weight."""
    return rms_norm_fwd(x, weight, eps, offset)[0]


def add_rms_norm(x, residual, weight, eps, offset):
    """The `triton` backend's fused add + RMSNorm: x, residual (N, C) -> (y, x + residual), each (N, C)."""
    y, total, _ = add_rms_norm_fwd(x, residual, weight, eps, offset)
    return y, total
