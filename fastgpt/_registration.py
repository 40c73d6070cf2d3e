"""Autograd and fake (meta) implementations of the fastgpt:: operators of csrc/ops.cpp.

The schemas and device kernels live in C++; what torch needs beyond them is
registered here, once, when fastgpt._C has loaded:
- fake impls, so torch.compile / FakeTensor can trace shapes without running kernels;
- autograd, so attention_fwd / layer_norm_fwd are differentiable through the
  registered backward operators (flash style: attention recomputes probabilities
  from the saved log-sum-exp, layer norm reuses the saved mean and rstd).
"""
from __future__ import annotations

import torch

from . import _extension


def _attention_fwd_fake(q, k, v, key_padding_mask, causal, scale, dropout_p, seed):
    B, H, Tq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Tq), dtype=torch.float32)


def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale, dropout_p, seed):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _layer_norm_fwd_fake(x, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


def _layer_norm_bwd_fake(grad_y, x, weight, mean, rstd):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, weight, weight))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed


def _attention_backward(ctx, grad_out, grad_lse):
    # lse is an internal output: nothing outside fastgpt consumes it, so grad_lse is unused.
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.fastgpt.attention_bwd(
        grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed)
    return grad_q, grad_k, grad_v, None, None, None, None, None


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean, rstd)
    return grad_x, grad_weight, grad_bias, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastgpt: double backward (gradients of gradients) through the fused attention "
                       "and layer-norm kernels is not supported; use backend='naive' or 'sdpa' for it")


def _keep_nothing(ctx, inputs, output):
    pass


def register() -> None:
    if _extension._C is None:
        return
    torch.library.register_fake("fastgpt::attention_fwd")(_attention_fwd_fake)
    torch.library.register_fake("fastgpt::attention_bwd")(_attention_bwd_fake)
    torch.library.register_fake("fastgpt::layer_norm_fwd")(_layer_norm_fwd_fake)
    torch.library.register_fake("fastgpt::layer_norm_bwd")(_layer_norm_bwd_fake)
    torch.library.register_autograd("fastgpt::attention_fwd", _attention_backward,
                                    setup_context=_attention_setup_context)
    torch.library.register_autograd("fastgpt::layer_norm_fwd", _layer_norm_backward,
                                    setup_context=_layer_norm_setup_context)
    for backward_op in ("fastgpt::attention_bwd", "fastgpt::layer_norm_bwd"):
        torch.library.register_autograd(backward_op, _no_double_backward, setup_context=_keep_nothing)


register()
