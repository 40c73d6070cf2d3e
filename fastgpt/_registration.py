"""The op contract: what torch needs of every fastgpt operator beyond its kernels, in one place.

Each op (attention, layer_norm, rms_norm) is a pair of operators `<impl><op>_fwd` / `<impl><op>_bwd`
in the `fastgpt` namespace; a fused variant may have a forward of its own and reuse another op's
backward (add_rms_norm_fwd differentiates through rms_norm_bwd). Each is implemented twice with
the same schemas:
- the C++/CUDA extension: fastgpt::attention_fwd, ... (schemas: csrc/ops.cpp), impl "";
- the Triton backend: fastgpt::triton_attention_fwd, ... (torch.library.custom_op in
  fastgpt/triton/<op>.py), impl "triton_".
For each op this module holds, and `register` installs for one implementation:
- fake (meta) impls of both operators, so torch.compile / FakeTensor trace shapes without
  running kernels;
- autograd of the forward (setup_context + backward), which calls that implementation's own
  backward operator (flash style: attention recomputes probabilities from the saved
  log-sum-exp, the norms reuse the saved mean and rstd);
- the double-backward guard on the backward operator: gradients of gradients raise clearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension

NAMESPACE = "fastgpt"


def _contiguous_like(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)


# ---- attention: q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) -> out (B, Hq, Tq, D), lse (B, Hq, Tq) float32
# (window 0 / softcap 0.0: none)

def _attention_fwd_fake(q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap):
    B, H, Tq, _ = q.shape
    return _contiguous_like(q)[0], q.new_empty((B, H, Tq), dtype=torch.float32)


def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale, dropout_p, seed, window,
                        softcap, grad_lse=None):
    return _contiguous_like(q, k, v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.options = causal, scale, dropout_p, seed, window, softcap


def _attention_backward(attention_bwd, ctx, grad_out, grad_lse):
    # lse is an output too (attention(return_lse=True), ring attention): its gradient, when one
    # flows, enters the backward through delta (see csrc/cpu/attention.cpp).
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, *ctx.options, grad_lse)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


# ---- layer norm: x (N, C), weight, bias (C,) -> y (N, C), mean, rstd (N,) float32 (float64 for float64 x)

def _layer_norm_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return _contiguous_like(x)[0], stats, stats.clone()


def _layer_norm_bwd_fake(grad_y, x, weight, mean, rstd):
    return _contiguous_like(x, weight, weight)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_backward(layer_norm_bwd, ctx, grad_y, grad_mean, grad_rstd):
    # mean and rstd are internal to fastgpt: nothing differentiates through them.
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = layer_norm_bwd(grad_y, x, weight, mean, rstd)
    return grad_x, grad_weight, grad_bias, None


# ---- RMSNorm: x (N, C), weight (C,) or None -> y (N, C), rstd (N,) float32 (float64 for float64 x);
# add_rms_norm: x, residual (N, C) -> y, sum = x + residual (N, C), rstd; both differentiate through
# rms_norm_bwd, whose grad_weight is empty (0,) when weight is None

def _stats_like(x):
    return x.new_empty((x.shape[0],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _rms_norm_fwd_fake(x, weight, eps, offset):
    return _contiguous_like(x)[0], _stats_like(x)


def _add_rms_norm_fwd_fake(x, residual, weight, eps, offset):
    return *_contiguous_like(x, x), _stats_like(x)


def _rms_norm_bwd_fake(grad_y, x, weight, rstd, offset):
    grad_weight = _contiguous_like(weight)[0] if weight is not None else x.new_empty((0,))
    return _contiguous_like(x)[0], grad_weight


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, offset = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset


def _rms_norm_backward(rms_norm_bwd, ctx, grad_y, grad_rstd):
    # rstd is internal to fastgpt: nothing differentiates through it.
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_bwd(grad_y, x, weight, rstd, ctx.offset)
    return grad_x, grad_weight if weight is not None else None, None, None


def _add_rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, eps, offset = inputs
    _, total, rstd = output
    ctx.save_for_backward(total, weight, rstd)  # the normalised input is the sum: x, residual are not needed
    ctx.offset = offset


def _add_rms_norm_backward(rms_norm_bwd, ctx, grad_y, grad_sum, grad_rstd):
    total, weight, rstd = ctx.saved_tensors
    grad_total, grad_weight = rms_norm_bwd(grad_y, total, weight, rstd, ctx.offset)
    grad_total = grad_total + grad_sum  # sum feeds the norm and the residual stream
    return grad_total, grad_total, grad_weight if weight is not None else None, None, None


# ---- the contract of each op, and its registration

@dataclass(frozen=True)
class OpContract:
    name: str  # the stem: <impl><name>_fwd / <impl><name>_bwd
    fwd_fake: Callable
    bwd_fake: Callable
    setup_context: Callable  # (ctx, fwd inputs, fwd outputs)
    backward: Callable  # (bwd operator, ctx, *grads of the fwd outputs) -> grads of the fwd inputs
    # The stem of the backward operator when it is another op's (whose contract registers its fake
    # impl and guard; bwd_fake is then None); None: this op's own <name>_bwd.
    backward_of: str | None = None

    @property
    def backward_stem(self) -> str:
        return self.backward_of or self.name


CONTRACTS = {
    "attention": OpContract("attention", _attention_fwd_fake, _attention_bwd_fake,
                            _attention_setup_context, _attention_backward),
    "layer_norm": OpContract("layer_norm", _layer_norm_fwd_fake, _layer_norm_bwd_fake,
                             _layer_norm_setup_context, _layer_norm_backward),
    "rms_norm": OpContract("rms_norm", _rms_norm_fwd_fake, _rms_norm_bwd_fake,
                           _rms_norm_setup_context, _rms_norm_backward),
    "add_rms_norm": OpContract("add_rms_norm", _add_rms_norm_fwd_fake, None,
                               _add_rms_norm_setup_context, _add_rms_norm_backward, backward_of="rms_norm"),
}


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastgpt: double backward (gradients of gradients) through the fused attention "
                       "and norm kernels is not supported; use backend='naive' or 'sdpa' for it")


def _keep_nothing(ctx, inputs, output):
    pass


def op_names(op: str, impl: str = "") -> tuple[str, str]:
    """The qualified names of an implementation's forward and backward operators of `op`
    (add_rms_norm's backward operator is rms_norm's)."""
    return f"{NAMESPACE}::{impl}{op}_fwd", f"{NAMESPACE}::{impl}{CONTRACTS[op].backward_stem}_bwd"


def register(op: str, impl: str = "") -> None:
    """Registers the fake impls, the autograd of the forward and the double-backward guard of
    `op` (a key of CONTRACTS) for the operators fastgpt::<impl><op>_fwd / _bwd, which must
    exist (TORCH_LIBRARY schemas or torch.library.custom_op). An op whose backward operator is
    another's registers only its forward; that op's own registration covers the backward."""
    contract = CONTRACTS[op]
    fwd, bwd = op_names(op, impl)
    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{impl}{contract.backward_stem}_bwd")

    def backward(ctx, *grads):
        return contract.backward(bwd_op, ctx, *grads)

    torch.library.register_fake(fwd, contract.fwd_fake)
    torch.library.register_autograd(fwd, backward, setup_context=contract.setup_context)
    if contract.backward_of is None:
        torch.library.register_fake(bwd, contract.bwd_fake)
        torch.library.register_autograd(bwd, _no_double_backward, setup_context=_keep_nothing)


def register_extension() -> None:
    """The C++/CUDA operators of fastgpt._C (when it loaded)."""
    if _extension._C is None:
        return
    for op in CONTRACTS:
        register(op)


register_extension()
