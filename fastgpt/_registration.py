"""The op contract: what torch needs of every fastgpt operator beyond its kernels, in one place.

Each op (attention, layer_norm) is a pair of operators `<impl><op>_fwd` / `<impl><op>_bwd` in
the `fastgpt` namespace, implemented twice with the same schemas:
- the C++/CUDA extension: fastgpt::attention_fwd, ... (schemas: csrc/ops.cpp), impl "";
- the Triton backend: fastgpt::triton_attention_fwd, ... (torch.library.custom_op in
  fastgpt/triton/<op>.py), impl "triton_".
For each op this module holds, and `register` installs for one implementation:
- fake (meta) impls of both operators, so torch.compile / FakeTensor trace shapes without
  running kernels;
- autograd of the forward (setup_context + backward), which calls that implementation's own
  backward operator (flash style: attention recomputes probabilities from the saved
  log-sum-exp, layer norm reuses the saved mean and rstd);
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
                        softcap):
    return _contiguous_like(q, k, v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.options = causal, scale, dropout_p, seed, window, softcap


def _attention_backward(attention_bwd, ctx, grad_out, grad_lse):
    # lse is internal to fastgpt (nothing differentiates through it), so grad_lse is unused.
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, *ctx.options)
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


# ---- the contract of each op, and its registration

@dataclass(frozen=True)
class OpContract:
    name: str  # the stem: <impl><name>_fwd / <impl><name>_bwd
    fwd_fake: Callable
    bwd_fake: Callable
    setup_context: Callable  # (ctx, fwd inputs, fwd outputs)
    backward: Callable  # (bwd operator, ctx, *grads of the fwd outputs) -> grads of the fwd inputs


CONTRACTS = {
    "attention": OpContract("attention", _attention_fwd_fake, _attention_bwd_fake,
                            _attention_setup_context, _attention_backward),
    "layer_norm": OpContract("layer_norm", _layer_norm_fwd_fake, _layer_norm_bwd_fake,
                             _layer_norm_setup_context, _layer_norm_backward),
}


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastgpt: double backward (gradients of gradients) through the fused attention "
                       "and layer-norm kernels is not supported; use backend='naive' or 'sdpa' for it")


def _keep_nothing(ctx, inputs, output):
    pass


def op_names(op: str, impl: str = "") -> tuple[str, str]:
    """The qualified names of an implementation's forward and backward operators of `op`."""
    return f"{NAMESPACE}::{impl}{op}_fwd", f"{NAMESPACE}::{impl}{op}_bwd"


def register(op: str, impl: str = "") -> None:
    """Registers the fake impls, the autograd of the forward and the double-backward guard of
    `op` ("attention" or "layer_norm") for the operators fastgpt::<impl><op>_fwd / _bwd,
    which must exist (TORCH_LIBRARY schemas or torch.library.custom_op)."""
    contract = CONTRACTS[op]
    fwd, bwd = op_names(op, impl)
    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{impl}{op}_bwd")

    def backward(ctx, *grads):
        return contract.backward(bwd_op, ctx, *grads)

    torch.library.register_fake(fwd, contract.fwd_fake)
    torch.library.register_fake(bwd, contract.bwd_fake)
    torch.library.register_autograd(fwd, backward, setup_context=contract.setup_context)
    torch.library.register_autograd(bwd, _no_double_backward, setup_context=_keep_nothing)


def register_extension() -> None:
    """The C++/CUDA operators of fastgpt._C (when it loaded)."""
    if _extension._C is None:
        return
    for op in CONTRACTS:
        register(op)


register_extension()
