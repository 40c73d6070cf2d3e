"""Drop-in modules on the fused kernels: the one attention, the one layer norm and the one RMSNorm of fastgpt.

- `LayerNorm`: torch.nn.LayerNorm's constructor and state_dict (weight, bias) over the
  last dim, running fastgpt.layer_norm; also loads the book's `scale` / `shift` names.
- `RMSNorm`: torch.nn.RMSNorm's constructor and state_dict (weight) plus `offset`
  (Gemma's x̂ · (1 + weight): offset=1.0, weight initialised to zeros), running
  fastgpt.rms_norm; also loads the book's `scale` name. `forward_add(x, residual)` is the
  pre-norm block's residual add and the next norm in one pass (fastgpt.add_rms_norm).
- `MultiHeadAttention` / `CausalAttention`: the book's constructors and state_dict
  (W_query, W_key, W_value[, out_proj]) running fastgpt.attention (causal, dropout on
  the attention weights in training). There is no T×T `mask` buffer: the kernels mask
  by index, so a book state_dict's `mask` entry is accepted and ignored, and
  `context_length` does not limit the sequence length.
- `GroupedQueryAttention`: the same module with the constructor of the book's Qwen 3 /
  Gemma 3 GroupedQueryAttention (d_in, num_heads, num_kv_groups, head_dim, qk_norm,
  query_pre_attn_scalar): grouped-query attention (W_key / W_value project to
  num_kv_groups heads; the kernel reads them without repeating them), a head_dim
  independent of d_in / num_heads, RoPE (forward(x, kv_cache, rope=(cos, sin))), optional
  QK-norm (RMSNorm over head_dim of queries and keys before RoPE), a sliding `window`,
  `softcap` on the scores and Gemma's query_pre_attn_scalar**-0.5 score scale.
  MultiHeadAttention takes the same options as keywords: it is one class underneath
  (only its forward keeps the book's (x, kv_cache=None), without rope; project(x, rope) and
  attend(q, k, v, window) are the two halves every forward is made of).
- `KVCache`: the keys and values one attention module has seen (num_kv_groups heads, RoPE
  applied), allocated once for max_len tokens; `forward(x, kv_cache)` appends the new ones and
  attends over all of them (Tq <= Tk, causal bottom-right aligned: new query i sees keys
  j <= i + Tk - Tq; a window keeps the last W of those). `new_kv_cache()` makes one.
  A decode step with static shapes, `forward(x, kv_cache, input_pos=pos)` for one token at
  position pos ((1,) int64 tensor): its keys and values are written in place at pos and it
  attends over the whole allocation with a key mask that keeps positions <= pos (and inside the
  window), so every step has the same shapes and torch.compile captures one graph for all of
  them (models.generation.Generation.decode_step).
(fastgpt.patch slots these modules into an existing model; fastgpt.models builds on them.)

Fused QKV (`fused_qkv=True`): one Linear `W_qkv` (d_in -> q + 2 kv widths, rows [query; key;
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


def _last_dim_shape(normalized_shape, module: str) -> tuple[int]:
    """normalized_shape as a 1-tuple; the norms of this file normalise over the last dim only."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"fastgpt.nn.{module} normalises over the last dim only: normalized_shape must be an "
                         f"int or a 1-tuple, got {normalized_shape!r}; use torch.nn.{module} to normalise "
                         f"over several dims")
    return shape


def _load_book_norm_names(state_dict: dict, prefix: str, names=_BOOK_NORM_NAMES) -> None:
    """Renames the book's names (scale / shift) of a norm at `prefix` to torch's (weight / bias), in place."""
    for book_name, torch_name in names:
        if prefix + book_name in state_dict and prefix + torch_name not in state_dict:
            state_dict[prefix + torch_name] = state_dict.pop(prefix + book_name)


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

    def write_at(self, keys: torch.Tensor, values: torch.Tensor, input_pos: torch.Tensor,
                 window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step with static shapes: stores one token's keys, values (B, H, 1, D) at position
        input_pos ((1,) int64 tensor) in place and returns the whole allocation (B, H, max_len, D)
        with the keys that token sees, bool (B, max_len): positions <= input_pos, and > input_pos -
        window with a window. `length` stays the caller's to advance (Generation.decode_step), so
        that nothing here depends on a Python number that changes from step to step."""
        if keys.shape[0] != self.batch_size or keys.shape[2] != 1:
            raise ValueError(f"a static decode step writes one token for each of the cache's {self.batch_size} "
                             f"sequences, got keys of shape {tuple(keys.shape)}")
        self.keys.index_copy_(2, input_pos, keys)
        self.values.index_copy_(2, input_pos, values)
        positions = torch.arange(self.max_len, device=self.keys.device)  # (max_len,)
        visible = positions <= input_pos
        if window is not None:
            visible = visible & (positions > input_pos - window)
        return self.keys, self.values, visible.expand(self.batch_size, self.max_len)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last dim, on fastgpt.layer_norm.

    x (..., C) -> (..., C). Parameters `weight` (C,) and `bias` (C,) as in torch; a state_dict
    with the book's `scale` / `shift` loads too (renamed on load).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        shape = _last_dim_shape(normalized_shape, "LayerNorm")
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
        _load_book_norm_names(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm over the last dim, on fastgpt.rms_norm, plus Gemma's `offset`.

    x (..., C) -> x · rsqrt(mean(x²) + eps) · (offset + weight), (..., C). eps=None is torch's
    default, torch.finfo(x.dtype).eps. Parameter `weight` (C,), initialised to 1 - offset
    (ones; zeros for Gemma's offset=1.0, whose checkpoints store weight - 1). A state_dict
    with the book's `scale` loads too (renamed on load).
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0, backend: str = "auto"):
        super().__init__()
        shape = _last_dim_shape(normalized_shape, "RMSNorm")
        self.normalized_shape = shape
        self.eps = eps
        self.offset = float(offset)
        self.elementwise_affine = elementwise_affine
        self.backend = check_backend_name(backend)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def _eps(self, x: torch.Tensor) -> float:
        return torch.finfo(x.dtype).eps if self.eps is None else self.eps

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(f"fastgpt.nn.RMSNorm: expected input (..., {self.normalized_shape[0]}), "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        self._check(x)
        return ops.rms_norm(x, self.weight, self._eps(x), offset=self.offset, backend=self.backend)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual) in one pass; x, residual (..., C)."""
        self._check(x)
        return ops.add_rms_norm(x, residual, self.weight, self._eps(x), offset=self.offset, backend=self.backend)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                f"{offset}, backend={self.backend!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_book_norm_names(state_dict, prefix, _BOOK_NORM_NAMES[:1])  # no bias: a `shift` stays unexpected
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, the split-halves layout of the book and Hugging Face:
    x (B, H, T, D), cos / sin (T, D) of the T positions -> x·cos + rotate_half(x)·sin, (B, H, T, D),
    with rotate_half(x) = [-x2, x1] for the halves x1 = x[..., :D/2], x2 = x[..., D/2:]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the tables are float32; compute in x's dtype, as HF does
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _CausalSelfAttention(nn.Module):
    """The book's causal self-attention on fastgpt.attention: project, split heads[, QK-norm]
    [, RoPE][, append to the KV cache], fused attention (dropout on the weights while
    training), merge heads[, out_proj].

    Shapes: queries num_heads x head_dim, keys / values num_kv_groups x head_dim (grouped-query
    attention: query head h reads kv head h // (num_heads // num_kv_groups)); out_proj maps
    num_heads * head_dim -> d_out. Defaults are the book's MultiHeadAttention: num_kv_groups =
    num_heads, head_dim = d_out // num_heads.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool, *, with_out_proj: bool, backend: str, fused_qkv: bool, device, dtype,
                 num_kv_groups: int | None = None, head_dim: int | None = None, qk_norm: bool = False,
                 norm_eps: float = 1e-6, norm_offset: float = 0.0, window: int | None = None,
                 softcap: float | None = None, query_pre_attn_scalar: float | None = None, out_bias: bool = True):
        super().__init__()
        if head_dim is None:
            if d_out % num_heads != 0:
                raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
            head_dim = d_out // num_heads
        num_kv_groups = num_heads if num_kv_groups is None else num_kv_groups
        if not 1 <= num_kv_groups <= num_heads or num_heads % num_kv_groups != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_groups ({num_kv_groups})")
        if window is not None and window < 1:
            raise ValueError(f"window must be None or >= 1 (keys per query, itself included), got {window}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.head_dim = head_dim
        self.context_length = context_length  # the book's signature; nothing T×T is allocated from it
        self.fused_qkv = fused_qkv
        self.window = window
        self.softcap = softcap
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.scale = None if query_pre_attn_scalar is None else float(query_pre_attn_scalar) ** -0.5  # None: 1/sqrt(D)
        self.backend = check_backend_name(backend)
        # Widths of the query, key and value projections (rows of W_qkv, in that order).
        self.qkv_sizes = (num_heads * head_dim, num_kv_groups * head_dim, num_kv_groups * head_dim)
        if not with_out_proj and self.qkv_sizes[0] != d_out:
            raise ValueError(f"without out_proj, num_heads * head_dim ({self.qkv_sizes[0]}) must equal d_out ({d_out})")
        factory = {"device": device, "dtype": dtype}
        if fused_qkv:
            self.W_qkv = nn.Linear(d_in, sum(self.qkv_sizes), bias=qkv_bias, **factory)
        else:
            for name, width in zip(_QKV, self.qkv_sizes):
                setattr(self, name, nn.Linear(d_in, width, bias=qkv_bias, **factory))
        self.out_proj = nn.Linear(self.qkv_sizes[0], d_out, bias=out_bias, **factory) if with_out_proj else None
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, offset=norm_offset, backend=backend, **factory)
            self.k_norm = RMSNorm(head_dim, norm_eps, offset=norm_offset, backend=backend, **factory)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = nn.Dropout(dropout)  # its p drops attention weights inside the kernel (Philox mask)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache (num_kv_groups heads) for up to max_len tokens, in the dtype and on the
        device of the projections."""
        weight = (self.W_qkv if self.fused_qkv else self.W_query).weight
        return KVCache(batch_size, self.num_kv_groups, max_len, self.head_dim, weight.dtype, weight.device)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, *,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out). With kv_cache, x holds the tokens that follow the
        cached ones: their keys and values are appended and they attend to all cached keys.
        With input_pos too, x is one token at that position: a static decode step (KVCache.write_at)."""
        return self._forward(x, kv_cache, None, input_pos)

    def _forward(self, x: torch.Tensor, kv_cache: KVCache | None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None,
                 input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """forward with rope = (cos, sin), each (T, head_dim): the rotary tables of x's T positions."""
        q, k, v = self.project(x, rope)
        if kv_cache is None:
            return self.attend(q, k, v, self.window)
        if input_pos is None:
            k, v = kv_cache.append(k, v)  # (B, Hkv, Tk, D), Tk = cached + T
            return self.attend(q, k, v, self.window)
        k, v, visible = kv_cache.write_at(k, v, input_pos, self.window)  # (B, Hkv, max_len, D), (B, max_len)
        # One query: the mask alone says which keys it sees (its causal and window bounds included).
        return self.attend(q, k, v, None, causal=False, key_padding_mask=visible)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, T, d_in) -> q (B, H, T, D), k, v (B, Hkv, T, D): split heads[, QK-norm][, RoPE]."""
        B, T, _ = x.shape
        if self.fused_qkv:
            queries, keys, values = self.W_qkv(x).split(self.qkv_sizes, dim=-1)
        else:
            queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        q = queries.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, self.num_kv_groups, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
                for t in (keys, values))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, *,
               causal: bool = True, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, H, T, D) over k, v (B, Hkv, Tk, D), Tk >= T -> (B, T, d_out): fused attention
        (dropout on the weights while training), merge heads[, out_proj]."""
        B, _, T, _ = q.shape
        dropout_p = self.dropout.p if self.training else 0.0
        # Causal with Tq = T <= Tk is bottom-right aligned: query i sees keys j <= i + (Tk - T)
        # (and with a window, the last `window` of those).
        context = ops.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, window=window,
                                softcap=self.softcap, dropout_p=dropout_p, scale=self.scale,
                                backend=self.backend)  # (B, H, T, D)
        context = context.transpose(1, 2).reshape(B, T, self.qkv_sizes[0])  # (B, T, H * D)
        return context if self.out_proj is None else self.out_proj(context)

    def extra_repr(self) -> str:
        extra = ""
        if self.num_kv_groups != self.num_heads:
            extra += f", num_kv_groups={self.num_kv_groups}"
        if self.head_dim * self.num_heads != self.d_out:
            extra += f", head_dim={self.head_dim}"
        for name in ("window", "softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None:
                extra += f", {name}={getattr(self, name)}"
        return f"num_heads={self.num_heads}{extra}, fused_qkv={self.fused_qkv}, backend={self.backend!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The book's T×T causal buffer: the kernels mask by index, so there is nothing to load.
        state_dict.pop(prefix + "mask", None)
        for param in ("weight", "bias"):
            separate = [f"{prefix}{name}.{param}" for name in _QKV]
            fused = f"{prefix}W_qkv.{param}"
            if self.fused_qkv and all(key in state_dict for key in separate):
                state_dict[fused] = torch.cat([state_dict.pop(key) for key in separate], dim=0)
            elif not self.fused_qkv and fused in state_dict and state_dict[fused].shape[0] == sum(self.qkv_sizes):
                for key, part in zip(separate, state_dict.pop(fused).split(self.qkv_sizes, dim=0)):
                    state_dict[key] = part
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MultiHeadAttention(_CausalSelfAttention):
    """The book's MultiHeadAttention (chapter 3.6.2) on the fused kernel.

    x (B, T, d_in) -> (B, T, d_out). Same constructor and state_dict as the book's
    (W_query, W_key, W_value, out_proj); `fused_qkv=True` uses one W_qkv projection.
    forward(x, kv_cache) decodes against a KVCache (see new_kv_cache). The keywords
    num_kv_groups, head_dim, qk_norm, window, softcap, query_pre_attn_scalar, out_bias are
    GroupedQueryAttention's (see there).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, backend: str = "auto", fused_qkv: bool = False, device=None, dtype=None,
                 **options):
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias, with_out_proj=True,
                         backend=backend, fused_qkv=fused_qkv, device=device, dtype=dtype, **options)


class GroupedQueryAttention(_CausalSelfAttention):
    """Grouped-query attention with RoPE and optional QK-norm: the constructor of the book's
    GroupedQueryAttention (Qwen 3 / Gemma 3), on the fused kernel.

    x (B, T, d_in) -> (B, T, d_in); forward(x, kv_cache=None, rope=(cos, sin)). W_query projects
    to num_heads * head_dim, W_key / W_value to num_kv_groups * head_dim, out_proj back to d_in;
    no biases unless qkv_bias. head_dim None: d_in // num_heads. qk_norm: RMSNorm q_norm / k_norm
    over head_dim (eps norm_eps, offset norm_offset: 1.0 for Gemma). query_pre_attn_scalar:
    scores scaled by its **-0.5 instead of head_dim**-0.5 (Gemma). window: sliding-window
    attention over the last `window` keys, itself included (transformers' sliding_window).
    softcap: scores become softcap * tanh(s / softcap).
    """

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int | None = None,
                 qk_norm: bool = False, query_pre_attn_scalar: float | None = None, dtype=None, *,
                 qkv_bias: bool = False, window: int | None = None, softcap: float | None = None,
                 norm_eps: float = 1e-6, norm_offset: float = 0.0, dropout: float = 0.0,
                 context_length: int | None = None, backend: str = "auto", fused_qkv: bool = False, device=None):
        if head_dim is None and d_in % num_heads != 0:
            raise ValueError(f"d_in ({d_in}) must be divisible by num_heads ({num_heads}) when head_dim is not set")
        super().__init__(d_in, d_in, context_length, dropout, num_heads, qkv_bias, with_out_proj=True,
                         backend=backend, fused_qkv=fused_qkv, device=device, dtype=dtype,
                         num_kv_groups=num_kv_groups, head_dim=head_dim, qk_norm=qk_norm, norm_eps=norm_eps,
                         norm_offset=norm_offset, window=window, softcap=softcap,
                         query_pre_attn_scalar=query_pre_attn_scalar, out_bias=qkv_bias)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, *,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_in). rope: (cos, sin), each (T, head_dim), the rotary tables
        of x's T positions (cos[start:start + T] with a KV cache of `start` tokens). input_pos:
        a static decode step (see MultiHeadAttention.forward)."""
        return self._forward(x, kv_cache, rope, input_pos)


class CausalAttention(_CausalSelfAttention):
    """The book's single-head CausalAttention (chapter 3.5) on the fused kernel.

    x (B, T, d_in) -> (B, T, d_out), scores scaled by 1/sqrt(d_out); no output projection.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False, *,
                 backend: str = "auto", fused_qkv: bool = False, device=None, dtype=None):
        super().__init__(d_in, d_out, context_length, dropout, 1, qkv_bias, with_out_proj=False,
                         backend=backend, fused_qkv=fused_qkv, device=device, dtype=dtype)


def _unfuse(state_dict: dict, sizes_of) -> dict:
    """state_dict with every `<prefix>W_qkv.weight|bias` split into W_query / W_key / W_value,
    by sizes_of(prefix) rows (None: three equal parts)."""
    out = {}
    for key, value in state_dict.items():
        prefix, sep, param = key.rpartition("W_qkv.")
        if sep and (prefix == "" or prefix.endswith(".")) and param in ("weight", "bias"):
            sizes = sizes_of(prefix)
            parts = value.chunk(3, dim=0) if sizes is None else value.split(sizes, dim=0)
            for name, part in zip(_QKV, parts):
                out[f"{prefix}{name}.{param}"] = part
        else:
            out[key] = value
    return out


def unfuse_qkv(state_dict: dict) -> dict:
    """A copy of `state_dict` with every `<prefix>W_qkv.weight|bias` split into the book's
    `<prefix>W_query|W_key|W_value.weight|bias` (three equal parts: multi-head attention;
    to_book_state_dict splits grouped-query ones by their module's widths)."""
    return _unfuse(state_dict, lambda prefix: None)


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
    that are not fastgpt.nn's keep their keys, and so does RMSNorm's `weight` (the book's
    Llama 3 uses torch.nn.RMSNorm, `weight`; its Qwen 3 / Gemma 3 RMSNorm say `scale`, which
    fastgpt.nn.RMSNorm loads).
    """
    state_dict = module.state_dict() if state_dict is None else state_dict
    renames, masks, sizes = {}, [], {}
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(child, LayerNorm):
            renames.update({prefix + ours: prefix + book for book, ours in _BOOK_NORM_NAMES})
        elif isinstance(child, _CausalSelfAttention):
            masks.append((prefix + "mask", (child.W_qkv if child.fused_qkv else child.W_query).weight.device))
            sizes[prefix] = child.qkv_sizes
    out = _unfuse({renames.get(key, key): value for key, value in state_dict.items()}, sizes.get)
    if context_length is not None:
        for key, device in masks:
            out[key] = torch.ones(context_length, context_length, device=device).triu(diagonal=1)
    return out


__all__ = ["KVCache", "LayerNorm", "RMSNorm", "MultiHeadAttention", "GroupedQueryAttention", "CausalAttention",
           "apply_rope", "unfuse_qkv", "to_book_state_dict"]
