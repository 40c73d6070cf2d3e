"""Drop-in modules on the fused kernels: the one attention and the one layer norm of fastgpt.

- `LayerNorm`: torch.nn.LayerNorm's constructor and state_dict (weight, bias) over the
  last dim, running fastgpt.layer_norm; also loads the book's `scale` / `shift` names.
- `MultiHeadAttention` / `CausalAttention`: the book's constructors and state_dict
  (W_query, W_key, W_value[, out_proj]) running fastgpt.attention (causal, dropout on
  the attention weights in training). There is no T×T `mask` buffer: the kernels mask
  by index, so a book state_dict's `mask` entry is accepted and ignored, and
  `context_length` does not limit the sequence length.
- `KVCache`: the keys and values one attention module has seen; `forward(x, kv_cache)`
  appends the new ones and attends over all of them (Tq <= Tk, causal bottom-right
  aligned: new query i sees keys j <= i + Tk - Tq). `new_kv_cache()` makes one.
(fastgpt.patch slots these modules into an existing model; fastgpt.models builds on them.)

Fused QKV (`fused_qkv=True`): one Linear `W_qkv` (d_in -> 3*d_out, rows [query; key;
value]) instead of three, so the projection is one matmul. Its state_dict holds
`W_qkv.weight` (and `.bias`); loading converts in both directions: a fused module loads
the book's separate W_query/W_key/W_value (concatenated on load), a separate module
loads W_qkv (split on load).

The book's names, both ways: any model built from these modules loads a state_dict of
the book's classes as is (scale/shift, `mask` buffers, separate or fused QKV), and
`to_book_state_dict(model)` rewrites the model's state_dict into the book's names, which
load strictly into the book's own classes. `unfuse_qkv(state_dict)` does the QKV split alone.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .backends import check_backend_name

_QKV = ("W_query", "W_key", "W_value")
_BOOK_NORM_NAMES = (("scale", "weight"), ("shift", "bias"))  # (the book's, torch's)


class KVCache:
    """The keys and values one attention module has seen so far, pre-allocated for max_len tokens."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.keys = torch.zeros(batch_size, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)  # (B, H, max_len, D), filled up to `length`
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores keys, values (B, H, T, D); returns all cached ones (B, H, length + T, D)."""
        end = self.length + keys.shape[2]
        if keys.shape[0] != self.batch_size or end > self.max_len:
            raise ValueError(f"the KV cache holds batch {self.batch_size} x {self.max_len} tokens; got batch "
                             f"{keys.shape[0]} with {self.length} cached + {keys.shape[2]} new tokens")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


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
        for book_name, torch_name in _BOOK_NORM_NAMES:
            if prefix + book_name in state_dict and prefix + torch_name not in state_dict:
                state_dict[prefix + torch_name] = state_dict.pop(prefix + book_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _CausalSelfAttention(nn.Module):
    """The book's causal self-attention on fastgpt.attention: project, split heads[, append
    to the KV cache], fused attention (dropout on the weights while training), merge
    heads[, out_proj]."""

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
        self.dropout = nn.Dropout(dropout)  # its p drops attention weights inside the kernel (Philox mask)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache for up to max_len tokens, in the dtype and on the device of the projections."""
        weight = (self.W_qkv if self.fused_qkv else self.W_query).weight
        return KVCache(batch_size, self.num_heads, max_len, self.head_dim, weight.dtype, weight.device)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out). With kv_cache, x holds the tokens that follow the
        cached ones: their keys and values are appended and they attend to all cached keys."""
        B, T, _ = x.shape
        if self.fused_qkv:
            queries, keys, values = self.W_qkv(x).split(self.d_out, dim=-1)  # 3 x (B, T, d_out)
        else:
            queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for t in (queries, keys, values))
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, H, Tk, D), Tk = cached + T
        dropout_p = self.dropout.p if self.training else 0.0
        # Causal with Tq = T <= Tk is bottom-right aligned: query i sees keys j <= i + (Tk - T).
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
    forward(x, kv_cache) decodes against a KVCache (see new_kv_cache).
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


def to_book_state_dict(module: nn.Module, state_dict: dict | None = None, *,
                       context_length: int | None = None) -> dict:
    """`state_dict` (default: module.state_dict()) in the names of the book's classes, so that
    it loads strictly into the book's GPTModel / MultiHeadAttention / CausalAttention / LayerNorm.

    `module` is the model the state_dict belongs to: its module tree says which keys are
    layer norms and which are attention modules. In the result:
    - every fastgpt.nn.LayerNorm's `weight` / `bias` is named `scale` / `shift`;
    - every fused `W_qkv` is split into W_query / W_key / W_value (as unfuse_qkv does);
    - with context_length, every attention module gets the book's causal `mask` buffer,
      triu(ones(context_length, context_length), diagonal=1), which the book's classes register
      (its GPTModel with cfg["context_length"]); without it, no mask entries are added.
    The tensors are shared with `state_dict`, not copied. Nothing else is renamed: modules
    that are not fastgpt.nn's keep their keys.
    """
    state_dict = module.state_dict() if state_dict is None else state_dict
    renames, masks = {}, []
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(child, LayerNorm):
            renames.update({prefix + ours: prefix + book for book, ours in _BOOK_NORM_NAMES})
        elif isinstance(child, _CausalSelfAttention):
            masks.append((prefix + "mask", (child.W_qkv if child.fused_qkv else child.W_query).weight.device))
    out = unfuse_qkv({renames.get(key, key): value for key, value in state_dict.items()})
    if context_length is not None:
        for key, device in masks:
            out[key] = torch.ones(context_length, context_length, device=device).triu(diagonal=1)
    return out


__all__ = ["KVCache", "LayerNorm", "MultiHeadAttention", "CausalAttention", "unfuse_qkv", "to_book_state_dict"]
