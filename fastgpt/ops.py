"""The public functional API: input checks and backend dispatch, in one place.

Everything a caller can get wrong is checked here, once, before any kernel runs, with one
message format: "fastgpt.<op>: <what> must be <expected>, got <actual>". What each backend
supports (dtypes, head dims, refusals) is declared in fastgpt.backends, which words those
errors. Kernels below this layer may assume valid input (their own checks are safety nets).
"""
from __future__ import annotations

import math

import torch

from . import backends, reference


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in backends.ALL_DTYPES:
        raise ValueError(f"fastgpt.{op}: {name} must be {backends.dtypes_expected()}, got {t.dtype}")


def _check_attention(q, k, v, key_padding_mask, dropout_p, scale, window, softcap) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastgpt.attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Tq, D)" if name == "q" else "(B, Hkv, Tk, D)"
            raise ValueError(f"fastgpt.attention: {name} must be 4-D {layout}, got shape {_shape(t)}")
        _check_dtype("attention", name, t)
    if k.shape != v.shape:
        raise ValueError(f"fastgpt.attention: k and v must have the same shape (B, Hkv, Tk, D), "
                         f"got k {_shape(k)} and v {_shape(v)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fastgpt.attention: q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) must agree in B and D, "
                         f"got q {_shape(q)} and k {_shape(k)}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"fastgpt.attention: B, H, Tq, Tk and D must all be at least 1, "
                         f"got q {_shape(q)} and k {_shape(k)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fastgpt.attention: the query heads Hq must be a multiple of the key/value heads Hkv "
                         f"(grouped-query attention), got Hq = {q.shape[1]} and Hkv = {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fastgpt.attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fastgpt.attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"fastgpt.attention: key_padding_mask must be a bool tensor (B, Tk) with True = keep, "
                             f"got {got}")
        B, Tk = k.shape[0], k.shape[2]
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"fastgpt.attention: key_padding_mask must have shape (B, Tk) = ({B}, {Tk}), "
                             f"got {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"fastgpt.attention: key_padding_mask must be on {q.device} (the device of q, k, v), "
                             f"got {key_padding_mask.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastgpt.attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"fastgpt.attention: window must be an int >= 1 (keys per query, itself included) "
                         f"or None, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not (math.isfinite(softcap) and softcap > 0)):
        raise ValueError(f"fastgpt.attention: softcap must be a positive finite number or None, got {softcap!r}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"fastgpt.attention: scale must be a finite number or None (1/sqrt(D)), got {scale!r}")
    return float(scale)


def _draw_seed() -> int:
    """A dropout seed from torch's default generator, so torch.manual_seed makes dropout repeatable."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              key_padding_mask: torch.Tensor | None = None, window: int | None = None,
              softcap: float | None = None, dropout_p: float = 0.0,
              scale: float | None = None, return_lse: bool = False,
              backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention softmax(mask(cap(q kᵀ · scale))) v, fused where the backend allows.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0 (grouped-query attention: query
    head h reads kv head h // (Hq // Hkv)) -> (B, Hq, Tq, D) in the dtype of q.
    causal: bottom-right aligned, query i (at position p = i + Tk - Tq) sees keys j <= p.
    key_padding_mask: bool (B, Tk), True = keep. A row with no visible key returns zeros.
    window: W keys per query, itself included: p - W < j (causal), |j - p| < W (non-causal).
    softcap: scores s become softcap * tanh(s / softcap) before masking (Gemma 2).
    dropout_p: dropout on the attention weights (Philox mask, identical across the fused backends).
    scale: defaults to 1/sqrt(D). backend: auto | naive | sdpa | cpu | cuda | triton.
    return_lse: also return lse (B, Hq, Tq) float32, the natural-log log-sum-exp of the masked,
    scaled (capped) scores before dropout (-inf for a row with no visible key): what ring attention
    and split-KV decoding merge partial results on. Differentiable in both outputs.
    """
    scale = _check_attention(q, k, v, key_padding_mask, dropout_p, scale, window, softcap)
    if not isinstance(return_lse, bool):
        raise ValueError(f"fastgpt.attention: return_lse must be a bool, got {return_lse!r}")
    features = backends.attention_features(q.shape[1], k.shape[1], window, softcap)
    chosen = backends.select(backend, q.device, q.dtype, q.shape[-1], features)
    seed = _draw_seed() if dropout_p > 0.0 else 0
    return chosen.attention(q, k, v, bool(causal), key_padding_mask, float(dropout_p), scale, seed,
                            0 if window is None else int(window), 0.0 if softcap is None else float(softcap),
                            return_lse)


def _check_rows(op: str, x) -> int:
    """x (..., C) with C >= 1 in a dtype some backend takes; returns C."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastgpt.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"fastgpt.{op}: x must have a non-empty last dim (..., C), got shape {_shape(x)}")
    _check_dtype(op, "x", x)
    return x.shape[-1]


def _check_param(op: str, name: str, t, x: torch.Tensor) -> torch.Tensor:
    """A per-column parameter of x (..., C): a floating-point (C,) tensor on x's device, cast to
    x's dtype (as under autocast; gradients flow back through the cast)."""
    C = x.shape[-1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastgpt.{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != (C,):
        raise ValueError(f"fastgpt.{op}: {name} must have shape (C,) = ({C},) to match x {_shape(x)}, "
                         f"got {_shape(t)}")
    if t.device != x.device:
        raise ValueError(f"fastgpt.{op}: {name} must be on {x.device} (the device of x), got {t.device}")
    if not t.is_floating_point():
        raise ValueError(f"fastgpt.{op}: {name} must be floating point, got {t.dtype}")
    return t.to(x.dtype)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_eps(op: str, eps) -> float:
    if not (_is_number(eps) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"fastgpt.{op}: eps must be a positive finite number, got {eps!r}")
    return float(eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """Layer norm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    x (..., C); weight, bias (C,) or None (ones / zeros). Statistics in float32 (or float64).
    weight and bias are cast to the dtype of x (as under autocast), gradients flow back.
    """
    C = _check_rows("layer_norm", x)
    params = [torch.full((C,), fill, dtype=x.dtype, device=x.device) if t is None
              else _check_param("layer_norm", name, t, x)
              for name, t, fill in (("weight", weight, 1.0), ("bias", bias, 0.0))]
    eps = _check_eps("layer_norm", eps)
    chosen = backends.select(backend, x.device, x.dtype)
    rows = x.reshape(-1, C)
    if rows.shape[0] == 0:
        return x * params[0] + params[1]
    return chosen.layer_norm(rows, params[0], params[1], eps).view(x.shape)


def _check_rms_norm(op: str, x, weight, eps, offset) -> tuple[torch.Tensor | None, float, float]:
    """(weight cast to x's dtype or None, eps, offset) of a valid rms_norm / add_rms_norm call."""
    _check_rows(op, x)
    weight = None if weight is None else _check_param(op, "weight", weight, x)
    eps = _check_eps(op, eps)
    if not (_is_number(offset) and math.isfinite(offset)):
        raise ValueError(f"fastgpt.{op}: offset must be a finite number (1.0: Gemma's 1 + weight), got {offset!r}")
    return weight, eps, float(offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, offset: float = 0.0,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim: x · rsqrt(mean(x²) + eps) · (offset + weight).

    x (..., C) -> (..., C) in the dtype of x; weight (C,), cast to the dtype of x, or None: no scale
    (y = x · rsqrt(mean(x²) + eps), torch.nn.RMSNorm(elementwise_affine=False)), whatever offset.
    offset=1.0 is Gemma's (1 + weight). Statistics in float32 (float64 for float64 x).
    Differentiable in x and weight.
    """
    weight, eps, offset = _check_rms_norm("rms_norm", x, weight, eps, offset)
    chosen = backends.select(backend, x.device, x.dtype, op="rms_norm")
    rows = x.reshape(-1, x.shape[-1])  # (N, C)
    if rows.shape[0] == 0:
        return reference.rms_norm(x, weight, eps, offset)
    return chosen.rms_norm(rows, weight, eps, offset).view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *,
                 offset: float = 0.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight, eps, offset=offset), x + residual) in one pass: a pre-norm
    block's residual add and the next norm. x, residual (..., C) of one shape, dtype and device;
    the sum is rounded to their dtype before it is normalised, as `h = x + residual;
    rms_norm(h)` does. Differentiable in x, residual and weight.
    """
    weight, eps, offset = _check_rms_norm("add_rms_norm", x, weight, eps, offset)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"fastgpt.add_rms_norm: residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"fastgpt.add_rms_norm: residual must have the shape, dtype and device of x "
                         f"({_shape(x)}, {x.dtype}, {x.device}), got {_shape(residual)}, {residual.dtype}, "
                         f"{residual.device}")
    chosen = backends.select(backend, x.device, x.dtype, op="add_rms_norm")
    C = x.shape[-1]
    rows, residual_rows = x.reshape(-1, C), residual.reshape(-1, C)  # (N, C) each
    if rows.shape[0] == 0:
        return reference.add_rms_norm(x, residual, weight, eps, offset)
    y, total = chosen.add_rms_norm(rows, residual_rows, weight, eps, offset)
    return y.view(x.shape), total.view(x.shape)


def info() -> dict[str, dict]:
    """Which backends are compiled and usable here, and why not. See fastgpt.backends.info."""
    return backends.info()
