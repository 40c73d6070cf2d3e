"""The book's attention, layer norm and RMSNorm, written plainly: the one oracle.

Every kernel in fastgpt is tested against these functions run in float64. They are
also the `naive` backend (run in the input dtype): matmul, mask, softmax, dropout,
matmul, materialising the (Tq, Tk) score matrix exactly as chapter 3 of
"Build a Large Language Model (from Scratch)" does.

Beyond the book: Tq <= Tk with bottom-right causal alignment (decoding with a KV
cache), a key padding mask, rows with no visible key return zeros, and dropout uses
the counter-based Philox stream of csrc/philox.h so its mask equals the kernels'.
And what today's models add: grouped-query attention (k, v with Hkv heads, Hq % Hkv == 0),
sliding windows and Gemma 2's logit softcap.
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mul_u32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a uint32 constant and uint32 values in int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_product = a * b_lo  # < 2^48
    t = a * b_hi + (lo_product >> 16)  # < 2^49: a * b == t * 2^16 + (lo_product & 0xFFFF)
    return t >> 16, ((t << 16) | (lo_product & 0xFFFF)) & _MASK32


def philox_uniform(seed: int, head_index: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """Triton's tl.rand(seed | head_index << 32, element) for a 32-bit element counter:
    Philox-4x32-10 with key (seed, head_index), counter (element, 0, 0, 0), float32 in [0, 1)."""
    element, head_index = torch.broadcast_tensors(element.to(torch.int64), head_index.to(torch.int64))
    c0, c1 = element & _MASK32, torch.zeros_like(element)
    c2, c3 = torch.zeros_like(element), torch.zeros_like(element)
    k0, k1 = seed & _MASK32, head_index & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_u32(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_u32(0xD2511F53, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep_mask(seed: int, B: int, H: int, Tq: int, Tk: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """bool (B, H, Tq, Tk): which attention weights survive dropout (csrc/philox.h scheme)."""
    head_index = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    element = (torch.arange(Tq, device=device, dtype=torch.int64).view(Tq, 1) * Tk
               + torch.arange(Tk, device=device, dtype=torch.int64).view(1, Tk))
    return philox_uniform(seed, head_index, element) >= torch.tensor(dropout_p, dtype=torch.float32)


def visible_keys(Tq: int, Tk: int, causal: bool, key_padding_mask: torch.Tensor | None,
                 device: torch.device | str, window: int | None = None) -> torch.Tensor:
    """bool (B or 1, 1, Tq, Tk): True where query i may attend to key j.
    With p = i + (Tk - Tq) the query's position: causal sees j <= p (bottom-right aligned);
    a window W keeps p - W < j (causal) or |j - p| < W (non-causal)."""
    position = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # (Tq, 1)
    j = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:  # the book's torch.triu(ones, diagonal=1) mask, shifted for Tq < Tk
        keep = keep & (j <= position)
    if window is not None:
        keep = keep & ((j > position - window) if causal else ((j - position).abs() < window))
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    return keep


def _repeat_kv(t: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, q_heads, T, D): each kv head once per query head of its group. Without
    groups, t itself: the naive backend's memory is the book's (T x T scores, no copies of k, v)."""
    groups = q_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """(B, Hq, Tq, Tk) scaled (and soft-capped) scores; k (B, Hkv, Tk, D) is repeated per query
    head group here, as transformers' repeat_kv does (query head h reads kv head h // (Hq // Hkv))."""
    k = _repeat_kv(k, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap is not None:  # Gemma 2's attn_logit_softcapping, before any mask
        scores = softcap * torch.tanh(scores / softcap)
    return scores


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              scale: float | None = None, seed: int = 0, window: int | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Naive attention in the dtype of q.
    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), Hq % Hkv == 0; key_padding_mask bool (B, Tk), True = keep."""
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    scores = _scores(q, k, scale, softcap)  # (B, Hq, Tq, Tk)
    keep = visible_keys(Tq, Tk, causal, key_padding_mask, q.device, window)
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    # A row with no visible key is all -inf, so softmax gives NaN there: such rows are zeros.
    weights = torch.where(keep.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))
    if dropout_p > 0.0:  # keyed by the query head b * Hq + h
        kept = dropout_keep_mask(seed, B, H, Tq, Tk, dropout_p, q.device)
        weights = torch.where(kept, weights / (1.0 - dropout_p), torch.zeros_like(weights))
    return weights @ _repeat_kv(v, H)


def attention_lse(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                  key_padding_mask: torch.Tensor | None = None,
                  scale: float | None = None, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """(B, Hq, Tq) log-sum-exp of the scaled, masked scores (-inf for rows with no visible key):
    what the fused kernels save for their backward pass. Differentiable: a row with no visible key
    takes its log-sum-exp over zeros and is then set to -inf, so no NaN flows back."""
    keep = visible_keys(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device, window)
    has_key = keep.any(dim=-1)  # (B|1, 1, Tq)
    scores = _scores(q, k, scale, softcap).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores.masked_fill(~has_key[..., None], 0.0), dim=-1)
    return lse.masked_fill(~has_key, float("-inf"))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5) -> torch.Tensor:
    """The book's LayerNorm over the last dim (biased variance), in the dtype of x."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
             offset: float = 0.0) -> torch.Tensor:
    """The book's RMSNorm over the last dim, x · rsqrt(mean(x²) + eps) · (offset + weight), as its
    Qwen3 / Gemma 3 chapters write it: computed in float32 for half-precision x (float64 stays
    float64), then cast back to the dtype of x. offset=1 is Gemma's (1 + weight). weight None:
    no scale at all (the normalised x, torch.nn.RMSNorm(elementwise_affine=False)); offset then
    plays no part: weight None is the identity scale in both conventions."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * (offset + weight.to(compute))
    return normed.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a pre-norm block's residual add and the next
    norm. The sum is rounded to the dtype of x before it is normalised, as the unfused code is."""
    total = x + residual
    return rms_norm(total, weight, eps, offset), total
