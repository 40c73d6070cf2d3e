"""Drop-in modules on the fused kernels.

- `LayerNorm`: torch.nn.LayerNorm's constructor and state_dict (weight, bias) over the
  last dim, running fastgpt.layer_norm; also loads the book's `scale` / `shift` names.
- `MultiHeadAttention` / `CausalAttention`: the book's constructors and state_dict
  (W_query, W_key, W_value[, out_proj]) running fastgpt.attention (causal, dropout on
  the attention weights in training). There is no T×T `mask` buffer: the kernels mask
  by index, so a book state_dict's `mask` entry is accepted and ignored, and
  `context_length` does not limit the sequence length.
(fastgpt.patch slots them into an existing model.)

Fused QKV (`fused_qkv=True`): one Linear `W_qkv` (d_in -> 3*d_out, rows [query; key;
value]) instead of three, so the projection is one matmul. Its state_dict holds
`W_qkv.weight` (and `.bias`); loading converts in both directions: a fused module loads
the book's separate W_query/W_key/W_value (concatenated on load), a separate module
loads W_qkv (split on load). `unfuse_qkv(state_dict)` rewrites a fused state_dict into
the book's names, for loading into the book's own classes.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .backends import check_backend_name

_QKV = ("W_query", "W_key", "W_value")


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dim, on fastgpt.layer_norm.

    x (..., C) -> (..., C). Parameters `weight` (C,) and `bias` (C,) as in torch; a state_dict
    with the book's `scale` / `shift` loads too (renamed on load).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"fastgpt.nn.LayerNorm normalises over the last dim only: normalized_shape must be an "
                             f"int or a 1-tuple, got {normalized_shape!r}; use torch.nn.LayerNorm to normalise "
                             f"over several dims")
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, **factory))
            self.bias = nn.Parameter(torch.zeros(shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(f"fastgpt.nn.LayerNorm: expected input (..., {self.normalized_shape[0]}), "
                             f"got shape {tuple(x.shape)}")
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"backend={self.backend!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for book_name, torch_name in (("scale", "weight"), ("shift", "bias")):
            if prefix + book_name in state_dict and prefix + torch_name not in state_dict:
                state_dict[prefix + torch_name] = state_dict.pop(prefix + book_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _CausalSelfAttention(nn.Module):
    """The book's causal self-attention on fastgpt.attention: project, split heads, fused
    attention (dropout on the weights while training), merge heads[, out_proj]."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool, *, with_out_proj: bool, backend: str, fused_qkv: bool, device, dtype):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length  # the book's signature; nothing T×T is allocated from it
        self.fused_qkv = fused_qkv
        self.backend = check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        if fused_qkv:
            self.W_qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias, **factory)
        else:
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias, **factory)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias, **factory)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias, **factory)
        self.out_proj = nn.Linear(d_out, d_out, **factory) if with_out_proj else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, d_in) -> (B, T, d_out)
        B, T, _ = x.shape
        if self.fused_qkv:
            queries, keys, values = self.W_qkv(x).split(self.d_out, dim=-1)  # 3 x (B, T, d_out)
        else:
            queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for t in (queries, keys, values))
        dropout_p = self.dropout.p if self.training else 0.0
        context = ops.attention(q, k, v, causal=True, dropout_p=dropout_p, backend=self.backend)  # (B, H, T, D)
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # (B, T, d_out)
        return context if self.out_proj is None else self.out_proj(context)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, fused_qkv={self.fused_qkv}, backend={self.backend!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The book's T×T causal buffer: the kernels mask by index, so there is nothing to load.
        state_dict.pop(prefix + "mask", None)
        for param in ("weight", "bias"):
            separate = [f"{prefix}{name}.{param}" for name in _QKV]
            fused = f"{prefix}W_qkv.{param}"
            if self.fused_qkv and all(key in state_dict for key in separate):
                state_dict[fused] = torch.cat([state_dict.pop(key) for key in separate], dim=0)
            elif not self.fused_qkv and fused in state_dict:
                for key, part in zip(separate, state_dict.pop(fused).chunk(3, dim=0)):
                    state_dict[key] = part
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MultiHeadAttention(_CausalSelfAttention):
    """The book's MultiHeadAttention (chapter 3.6.2) on the fused kernel.

    x (B, T, d_in) -> (B, T, d_out). Same constructor and state_dict as the book's
    (W_query, W_key, W_value, out_proj); `fused_qkv=True` uses one W_qkv projection.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, backend: str = "auto", fused_qkv: bool = False, device=None, dtype=None):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias, with_out_proj=True,
                         backend=backend, fused_qkv=fused_qkv, device=device, dtype=dtype)


class CausalAttention(_CausalSelfAttention):
    """The book's single-head CausalAttention (chapter 3.5) on the fused kernel.

    x (B, T, d_in) -> (B, T, d_out), scores scaled by 1/sqrt(d_out); no output projection.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False, *,
                 backend: str = "auto", fused_qkv: bool = False, device=None, dtype=None):
        super().__init__(d_in, d_out, context_length, dropout, 1, qkv_bias, with_out_proj=False,
                         backend=backend, fused_qkv=fused_qkv, device=device, dtype=dtype)


def unfuse_qkv(state_dict: dict) -> dict:
    """A copy of `state_dict` with every `<prefix>W_qkv.weight|bias` split into the book's
    `<prefix>W_query|W_key|W_value.weight|bias`, for loading into the book's classes."""
    out = {}
    for key, value in state_dict.items():
        prefix, sep, param = key.rpartition("W_qkv.")
        if sep and (prefix == "" or prefix.endswith(".")) and param in ("weight", "bias"):
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}{name}.{param}"] = part
        else:
            out[key] = value
    return out


__all__ = ["LayerNorm", "MultiHeadAttention", "CausalAttention", "unfuse_qkv"]
