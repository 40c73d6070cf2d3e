"""`import fastgpt.hf` registers attn_implementation="fastgpt" with Hugging Face transformers.

    import fastgpt.hf
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="fastgpt")

Two registrations, both under one name:
- an attention function (transformers' AttentionInterface) that runs fastgpt.attention;
- a mask function (AttentionMaskInterface). Without one, transformers builds no mask at all
  for a custom implementation and padding would be silently ignored. Ours returns, for the
  plain causal mask, the 2-D key padding mask (B, Tk) (or None when there is none), which
  the attention function runs as causal + key_padding_mask.

The fused path covers causal self-attention with or without key padding, including
decoding with a KV cache (Tq <= Tk, causal bottom-right aligned: query i sits at position
i + Tk - Tq), dynamic or static (a static cache's empty slots are cut off). A mask it cannot
express — a 4-D mask given by the caller, sliding windows, packed sequences, cache offsets
that only a tensor holds under torch.compile — is built the way transformers builds it for
"sdpa", and those calls run transformers' sdpa attention, with a one-time warning naming
the reason (under torch.compile, where a warning would break the graph, the reason is only
recorded in fastgpt.hf.FALLBACKS): a fallback, never a different result.

`register(backend="cpu", name="fastgpt-cpu")` registers the same pair for an explicit backend.
"""
from __future__ import annotations

import functools
import warnings

import torch
import transformers

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # both interfaces exist from transformers 4.53 on
    raise ImportError(f"fastgpt.hf needs transformers >= 4.53 (AttentionInterface and AttentionMaskInterface); "
                      f"transformers {transformers.__version__} is installed ({error})") from error

from . import ops
from .backends import check_backend_name

# Keyword arguments some models pass that change the attention itself (logit soft-capping,
# T5-style position bias, sliding windows, attention sinks): fastgpt.attention has none of them.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "sliding_window", "s_aux", "sinks")
REGISTERED: set[str] = set()  # attn_implementation names that run fastgpt (see fastgpt.patch)
FALLBACKS: set[str] = set()  # why calls ran transformers' sdpa instead, including calls under torch.compile
_warned: set[str] = set()


def _fall_back(reason: str) -> None:
    """Records (and, outside torch.compile, warns once about) a call that runs sdpa instead."""
    FALLBACKS.add(reason)
    # A warning inside a compiled region would break the graph (an error under fullgraph=True),
    # so compiled calls are only recorded in FALLBACKS.
    if not torch.compiler.is_compiling() and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastgpt.hf: {reason}; these calls run transformers' sdpa attention instead",
                      RuntimeWarning, stacklevel=3)


def _as_int(value) -> int | None:
    """`value` as a Python int, or None where reading a tensor would break a torch.compile graph."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        return int(value.item())
    return None


def fastgpt_mask(batch_size: int, kv_length: int, mask_function=causal_mask_function, attention_mask=None,
                 kv_offset: int = 0, **kwargs):
    """The mask transformers hands to the fastgpt attention function.

    Plain causal attention over keys at positions [kv_offset, kv_offset + Tk) for queries at
    [q_offset, q_offset + Tq): keys past the last query are invisible to every query (a static
    cache's empty slots), so only the first Tk' = q_offset + Tq - kv_offset keys matter and the
    queries are their last Tq: causal bottom-right aligned over Tk' keys. Returns
      - None: no padding and Tk' == Tk (causal alone);
      - the key padding mask bool (B, Tk'), True = keep; Tk' < Tk tells the attention
        function to use only the first Tk' keys.
    Anything else (other mask patterns, offsets unknown under torch.compile) -> the 4-D bool
    mask transformers builds for sdpa, which the attention function hands to the fallback.
    Takes both signatures of transformers' mask functions: (q_length, q_offset) and the older
    cache_position (Tq,).
    """
    cache_position = kwargs.get("cache_position")
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    q_start, kv_start = _as_int(q_offset), _as_int(kv_offset)
    if (mask_function is causal_mask_function and q_start is not None and kv_start is not None
            and kv_start <= q_start and q_start + q_length <= kv_start + kv_length):
        visible = q_start + q_length - kv_start  # Tk'
        if attention_mask is None:
            if visible == kv_length:
                return None
            device = kwargs.get("device", cache_position.device if cache_position is not None else "cpu")
            return torch.ones(batch_size, visible, dtype=torch.bool, device=device)
        keep = attention_mask.to(torch.bool)  # (B, seen + Tq): True = a real token
        missing = kv_start + visible - keep.shape[-1]
        if missing > 0:  # positions past the 2-D mask hold no token
            keep = torch.nn.functional.pad(keep, (0, missing), value=False)
        return keep[:, kv_start:kv_start + visible].expand(batch_size, visible)  # (B, Tk')
    sdpa_kwargs = dict(kwargs, allow_is_causal_skip=False)  # a None here would mean top-left causal
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=batch_size, kv_length=kv_length,
                                                mask_function=mask_function, attention_mask=attention_mask,
                                                kv_offset=kv_offset, **sdpa_kwargs)


def fastgpt_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, *, backend: str = "auto", **kwargs):
    """transformers' attention function signature, on fastgpt.attention.

    query (B, H, Tq, D), key/value (B, Hkv, Tk, D), attention_mask from `fastgpt_mask`
    -> (attn_output (B, Tq, H, D), None): fused kernels return no attention weights.
    """
    unsupported = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    reason = None
    if unsupported:
        reason = f"fastgpt.attention has no {', '.join(unsupported)}"
    elif attention_mask is not None and not (attention_mask.dtype == torch.bool and attention_mask.dim() == 2
                                             and attention_mask.shape[-1] <= key.shape[2]):
        reason = (f"a {attention_mask.dim()}-D {str(attention_mask.dtype).replace('torch.', '')} attention mask "
                  f"of shape {tuple(attention_mask.shape)} cannot be expressed as causal + key padding")
    if reason is not None:
        _fall_back(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_mask is None:  # no padding: causality as the module declares it (like transformers' sdpa)
        is_causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    else:  # fastgpt_mask returns a 2-D mask only for causal attention; keys past its length are invisible
        causal = True
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # grouped-query attention: each key/value head serves heads // kv_heads query heads
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = ops.attention(query, key, value, causal=bool(causal), key_padding_mask=attention_mask,
                        dropout_p=dropout, scale=scaling, backend=backend)  # (B, H, Tq, D)
    return out.transpose(1, 2), None  # (B, Tq, H, D), as transformers' attention functions return


def register(backend: str = "auto", name: str = "fastgpt") -> str:
    """Register attn_implementation=`name` running fastgpt.attention on `backend`; returns `name`."""
    check_backend_name(backend)
    AttentionInterface.register(name, functools.partial(fastgpt_attention_forward, backend=backend))
    AttentionMaskInterface.register(name, fastgpt_mask)
    REGISTERED.add(name)
    return name


register()
