"""The comparisons every backend's tests share: inputs, the float64 oracle, tolerances.

Tolerance rule (one for all backends):
- float32 / float64: max |got - oracle| <= rtol * max |oracle| (rtol 1e-5 for float32,
  1e-10 for float64), with the oracle in float64;
- float16 / bfloat16: within 2x the error that the naive reference makes in the same
  dtype against the float64 oracle, never below one ulp of the output's scale.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastgpt import reference

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_qkv(B, H, Tq, Tk, D, dtype=torch.float32, device="cpu", requires_grad=False, transposed=False,
             generator_seed=0):
    """q (B, H, Tq, D), k, v (B, H, Tk, D); `transposed` builds them as views of (B, T, H, D)
    tensors, the layout a model's projection produces (non-contiguous)."""
    gen = torch.Generator().manual_seed(generator_seed)

    def one(T):
        if transposed:
            t = torch.randn(B, T, H, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad) if requires_grad else t

    return one(Tq), one(Tk), one(Tk)


def padding_mask(B, Tk, device="cpu", fully_masked_row=True, generator_seed=1):
    """bool (B, Tk), True = keep; with `fully_masked_row`, batch 0 sees no key at all."""
    gen = torch.Generator().manual_seed(generator_seed)
    mask = torch.rand(B, Tk, generator=gen) > 0.3
    if fully_masked_row:
        mask[0] = False
    return mask.to(device)


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


def tolerance(dtype: torch.dtype, oracle: torch.Tensor, same_dtype_result: torch.Tensor | None) -> float:
    """Allowed max abs error for a result in `dtype` against the float64 `oracle`."""
    scale = max(oracle.abs().max().item(), 1.0)
    if dtype in RTOL:
        return RTOL[dtype] * scale
    baseline = max_abs_err(same_dtype_result, oracle)
    return max(2 * baseline, torch.finfo(dtype).eps * scale)


def assert_close(got: torch.Tensor, oracle: torch.Tensor, same_dtype_result: torch.Tensor | None = None,
                 what: str = "output"):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, tol = max_abs_err(got, oracle), tolerance(got.dtype, oracle, same_dtype_result)
    assert err <= tol, f"{what}: max abs err {err:.3e} > tol {tol:.3e} ({got.dtype})"


# The layouts autograd hands a norm's backward as grad_y (N, C): y.sum().backward() gives an
# expanded scalar (strides 0, 0), a broadcast row gives strides (0, 1); slices and transposes the rest.
GRAD_LAYOUTS = ("expanded_scalar", "expanded_row", "row_stride", "column_major")


def grad_in_layout(grad: torch.Tensor, layout: str) -> torch.Tensor:
    """grad (N, C) rebuilt in `layout` (values change for the expanded ones: a scalar or a row)."""
    N, C = grad.shape
    if layout == "expanded_scalar":
        return grad[0, 0].expand(N, C)
    if layout == "expanded_row":
        return grad[0].expand(N, C)
    if layout == "row_stride":
        return torch.cat([grad, grad], dim=1)[:, :C]
    return grad.t().contiguous().t()


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of a module: the oracle for its drop-in replacement."""
    return copy.deepcopy(module).double()


def attention_oracle(q, k, v, causal, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0, window=None,
                     softcap=None):
    """(float64 oracle, same-dtype naive result) for the same call."""
    oracle = reference.attention(q.double(), k.double(), v.double(), causal, key_padding_mask,
                                 dropout_p, scale, seed, window, softcap)
    same = reference.attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap)
    return oracle, same
