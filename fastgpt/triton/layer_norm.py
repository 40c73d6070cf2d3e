"""Layer norm in Triton: the fused forward and backward of the `triton` backend.

Forward: one program normalises BLOCK_R whole rows held in registers (BLOCK_C = the
next power of two >= C columns), so the passes over a row cost arithmetic, not memory.
Corrected two-pass statistics, as the C++ kernel (csrc/cpu/layer_norm.cpp):
  m = Σx / C;  d = x - m;  c = Σd / C        d is small: Σd² has no cancellation (unlike
  var = Σd² / C - c²;  rstd = 1/sqrt(var+eps)  E[x²] - E[x]²) and c repairs the rounding of m
  y = (d - c) · rstd · w + b                 y never sees mean rounded to float32 (ulp(1e3)
                                             is 6e-5, far above float32 accuracy for y)
It saves mean = m + c and rstd (float32) for the backward pass, which recomputes the same
correction c = Σ(x - mean) / C against the saved, rounded mean.

Backward, with x̂ = (x - mean) · rstd and g = w · dy:
  dx = rstd · (g - mean_c(g) - x̂ · mean_c(g · x̂))       (per row)
  dw = Σ_rows dy · x̂,  db = Σ_rows dy                    (per column)
The column sums are the hard part at GPT-2 widths (C = 768..1600): instead of
per-element atomics, the rows are cut into groups of `rows_per_group` consecutive
rows; one program per group computes dx for its rows and keeps its partial dw, db in
registers, written once to a (num_groups, C) float32 buffer; a second small kernel
sums the buffer over groups. On a GPU there are 4 groups per SM: enough programs to
keep loads in flight while each walks its rows, and a buffer (4·SMs·C floats) that is
small next to x, dy and dx at GPT-2 batch sizes.

Autotuning (see fastgpt/triton/_launch.py), keyed on C (plus dtypes); candidates pruned
to BLOCK_R · BLOCK_C <= 8192 elements per program (BLOCK_R rows at a time):
  forward   (BLOCK_R, num_warps) (1, 4) (1, 8) (2, 4) (2, 8) (4, 8), one stage (no loop)
  backward  (BLOCK_R, num_warps) (1, 4) (2, 4) (4, 8) (8, 8), two stages (the row loop's
            loads are prefetched one block ahead)
The group-sum kernel is fixed (64 groups x 64 columns per step). Under TRITON_INTERPRET=1:
BLOCK_R = 16, and 4 row groups in the backward.

Inputs may have any strides (x is a (N, C) view); y, dx are contiguous (N, C). Row offsets are
int64; column offsets int32, after the host copied a view whose C · column stride passes 2^31.
"""
import functools

import torch
import triton
import triton.language as tl

from .. import _registration
from . import _launch
from ._launch import config

MAX_C = 65536  # a row must fit in one program's registers (Triton blocks hold <= 2^20 elements)
ELEMENTS_PER_PROGRAM = 8192
GROUPS_PER_SM = 4
INTERPRETER_GROUPS = 4
SUM_BLOCK_G, SUM_BLOCK_C = 64, 64


def _prune_to_width(configs, named_args, **kwargs):
    """Keep BLOCK_R · BLOCK_C <= ELEMENTS_PER_PROGRAM (one row per program always fits)."""
    block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
    fitting = [c for c in configs if c.kwargs["BLOCK_R"] * block_c <= ELEMENTS_PER_PROGRAM]
    return fitting or [c for c in configs if c.kwargs["BLOCK_R"] == 1]


FWD_CONFIGS = [config(4, 1, BLOCK_R=1), config(8, 1, BLOCK_R=1), config(4, 1, BLOCK_R=2),
               config(8, 1, BLOCK_R=2), config(8, 1, BLOCK_R=4)]
BWD_CONFIGS = [config(4, 2, BLOCK_R=1), config(4, 2, BLOCK_R=2), config(8, 2, BLOCK_R=4), config(8, 2, BLOCK_R=8)]
INTERPRETER_CONFIG = config(1, 1, BLOCK_R=16)


@_launch.autotune(FWD_CONFIGS, INTERPRETER_CONFIG, key=["C"], prune=_prune_to_width)
@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                           stride_xn, stride_xc, stride_w, stride_b, N, C, eps,
                           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # x (N, C), w, b (C,) any strides; y (N, C) contiguous; mean, rstd (N,) float32.
    # Grid (cdiv(N, BLOCK_R),).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + cols[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_C)
    first_mean = tl.sum(x, 1) / C  # (BLOCK_R,)
    d = tl.where(mask, x - first_mean[:, None], 0.0)
    correction = tl.sum(d, 1) / C
    rstd = tl.math.rsqrt(tl.sum(d * d, 1) / C - correction * correction + eps)
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)
    y = (d - correction[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, first_mean + correction, mask=rows < N)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@_launch.autotune(BWD_CONFIGS, INTERPRETER_CONFIG, key=["C"], prune=_prune_to_width)
@triton.jit
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
                           stride_dyn, stride_dyc, stride_xn, stride_xc, stride_w, N, C, rows_per_group,
                           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # dy, x (N, C), w (C,) any strides; mean, rstd (N,) float32; dx (N, C) contiguous;
    # dw_partial, db_partial (num_groups, C) float32. Grid (num_groups,).
    group = tl.program_id(0)
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, N)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)  # reduced over rows once, after the loop
    db_acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dyn + cols[None, :] * stride_dyc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        d = tl.where(mask, x - mean[:, None], 0.0)
        correction = tl.sum(d, 1) / C  # repairs the rounding of the saved mean, as in the forward
        x_hat = tl.where(mask, (d - correction[:, None]) * rstd[:, None], 0.0)  # (BLOCK_R, BLOCK_C)
        g = dy * w[None, :]  # 0 outside the mask, as dy is
        mean_g = tl.sum(g, 1) / C
        mean_g_x_hat = tl.sum(g * x_hat, 1) / C
        dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
    tl.store(dw_partial_ptr + group * C + cols, tl.sum(dw_acc, 0), mask=col_ok)
    tl.store(db_partial_ptr + group * C + cols, tl.sum(db_acc, 0), mask=col_ok)


@triton.jit
def _sum_groups_kernel(dw_partial_ptr, db_partial_ptr, dw_ptr, db_ptr, num_groups, C,
                       BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # dw_partial, db_partial (num_groups, C) float32 -> dw, db (C,) in the weight's dtype.
    # Grid (cdiv(C, BLOCK_C),).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    dw_acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for start in range(0, num_groups, BLOCK_G):
        groups = start + tl.arange(0, BLOCK_G)
        mask = (groups < num_groups)[:, None] & col_ok[None, :]
        offsets = groups[:, None] * C + cols[None, :]
        dw_acc += tl.load(dw_partial_ptr + offsets, mask=mask, other=0.0)
        db_acc += tl.load(db_partial_ptr + offsets, mask=mask, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(dw_acc, 0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    tl.store(db_ptr + cols, tl.sum(db_acc, 0).to(db_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- host side

@functools.lru_cache(maxsize=None)
def _target_groups(device: torch.device) -> int:
    if device.type == "cuda":
        return GROUPS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_GROUPS


def row_groups(N: int, device: torch.device) -> tuple[int, int]:
    """(rows_per_group, num_groups) of the backward's dweight/dbias reduction over N rows;
    the last group may be shorter."""
    rows_per_group = triton.cdiv(N, _target_groups(device))
    return rows_per_group, triton.cdiv(N, rows_per_group)


def int32_columns(C: int, *tensors):
    """The tensors ((N, C) rows or (C,) weights, None passes through), each copied if its column
    offsets cols · stride could pass int32: the kernels widen the row index to int64, not the
    column index (`_launch.int32_tile_offsets`)."""
    return tuple(_launch.int32_tile_offsets(t, {t.dim() - 1: C} if t is not None else {}) for t in tensors)


def _block_c(op: str, C: int) -> int:
    torch._check(C <= MAX_C, lambda: f"fastgpt::{op}: C must be at most {MAX_C} (a row is kept in registers), "
                                     f"got {C}")
    return max(16, triton.next_power_of_2(C))


@torch.library.custom_op("fastgpt::triton_layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C), weight, bias (C,) any strides -> y (N, C) contiguous in x's dtype,
    mean, rstd (N,) float32."""
    N, C = x.shape
    op = "triton_layer_norm_fwd"
    _launch.check_capabilities(op, "layer_norm", x)
    torch._check(weight.shape == (C,) and bias.shape == (C,),
                 lambda: f"fastgpt::{op}: weight and bias must have shape (C,) = ({C},), "
                         f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    x, weight, bias = int32_columns(C, x, weight, bias)
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)  # (N, C)
    mean = torch.empty((N,), dtype=torch.float32, device=x.device)  # (N,)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)  # (N,)
    with _launch.device_guard(x):
        _layer_norm_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_R"]),)](
            x, weight, bias, y, mean, rstd, *x.stride(), weight.stride(0), bias.stride(0), N, C, eps,
            BLOCK_C=_block_c(op, C))
    return y, mean, rstd


@torch.library.custom_op("fastgpt::triton_layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y, x (N, C) any strides, weight (C,), mean, rstd (N,) float32 from layer_norm_fwd
    -> grad_x (N, C) contiguous, grad_weight, grad_bias (C,) in weight's dtype."""
    N, C = x.shape
    op = "triton_layer_norm_bwd"
    _launch.check_capabilities(op, "layer_norm", x)
    torch._check(grad_y.shape == (N, C) and weight.shape == (C,),
                 lambda: f"fastgpt::{op}: grad_y must be (N, C) = ({N}, {C}) and weight (C,), "
                         f"got {tuple(grad_y.shape)} and {tuple(weight.shape)}")
    torch._check(all(t.shape == (N,) and t.dtype == torch.float32 and t.is_contiguous() for t in (mean, rstd)),
                 lambda: f"fastgpt::{op}: mean and rstd must be contiguous float32 (N,) = ({N},), "
                         f"got {mean.dtype} {tuple(mean.shape)} and {rstd.dtype} {tuple(rstd.shape)}")
    grad_y, x, weight = int32_columns(C, grad_y, x, weight)
    rows_per_group, num_groups = row_groups(N, x.device)
    grad_x = torch.empty((N, C), dtype=x.dtype, device=x.device)  # (N, C)
    dw_partial = torch.empty((num_groups, C), dtype=torch.float32, device=x.device)  # (num_groups, C)
    db_partial = torch.empty((num_groups, C), dtype=torch.float32, device=x.device)  # (num_groups, C)
    grad_weight = torch.empty((C,), dtype=weight.dtype, device=x.device)  # (C,)
    grad_bias = torch.empty((C,), dtype=weight.dtype, device=x.device)  # (C,)
    with _launch.device_guard(x):
        _layer_norm_bwd_kernel[(num_groups,)](
            grad_y, x, weight, mean, rstd, grad_x, dw_partial, db_partial,
            *grad_y.stride(), *x.stride(), weight.stride(0), N, C, rows_per_group, BLOCK_C=_block_c(op, C))
        _sum_groups_kernel[(triton.cdiv(C, SUM_BLOCK_C),)](
            dw_partial, db_partial, grad_weight, grad_bias, num_groups, C, BLOCK_G=SUM_BLOCK_G, BLOCK_C=SUM_BLOCK_C)
    return grad_x, grad_weight, grad_bias


_registration.register("layer_norm", impl="triton_")  # fake impls, autograd, double-backward guard


def layer_norm(x, weight, bias, eps):
    """The `triton` backend's layer norm: x (N, C) rows, weight, bias (C,) in x's dtype -> (N, C).
    Inputs are validated by fastgpt.ops; differentiable in x, weight and bias."""
    return layer_norm_fwd(x, weight, bias, eps)[0]
