"""`import fastgpt.hf` registers attn_implementation="fastgpt" with Hugging Face transformers.

    import fastgpt.hf
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="fastgpt")

Two registrations, both under one name:
- an attention function (transformers' AttentionInterface) that runs fastgpt.attention;
- a mask function (AttentionMaskInterface). Without one, transformers builds no mask at all
  for a custom implementation and padding would be silently ignored. Ours returns, for the
  plain and the sliding-window causal mask, the 2-D key padding mask (B, Tk) (or None when
  there is none), which the attention function runs as causal + key_padding_mask (+ window).

The fused path covers causal self-attention with or without key padding, including
decoding with a KV cache (Tq <= Tk, causal bottom-right aligned: query i sits at position
i + Tk - Tq), dynamic or static (a static cache's empty slots are cut off), and what today's
models add to it:
- grouped-query attention: key/value (B, Hkv, Tk, D) go to fastgpt.attention as they are
  (query head h reads kv head h // (Hq // Hkv), transformers' repeat_kv order), never repeated;
- sliding windows (Mistral, Qwen2/3 with use_sliding_window, Gemma 2/3's sliding layers):
  the mask function recognises transformers' sliding-window causal mask and returns the same
  2-D key padding mask as for the plain causal one; the window itself reaches fastgpt.attention
  as window= from the `sliding_window` keyword the model passes its attention function (the
  convention transformers' own flash-attention path relies on);
- logit soft-capping (Gemma 2's attn_logit_softcapping, the `softcap` keyword) as softcap=.
A mask it cannot express — a 4-D mask given by the caller, packed sequences, chunked or
bidirectional patterns, cache offsets that only a tensor holds under torch.compile — is built
the way transformers builds it for "sdpa", and those calls run transformers' sdpa attention
(soft-capped ones the model's own eager attention: sdpa has no softcap), with a one-time
warning naming the reason (under torch.compile, where a warning would break the graph, the
reason is only recorded in fastgpt.hf.FALLBACKS): a fallback, never a different result. So do
calls that use keywords fastgpt.attention has no counterpart for (position_bias, attention
sinks). A backend registered explicitly that does not (yet) implement a feature a call needs
(fastgpt.backends.REGISTRY[name].features) runs that call on fastgpt's `auto` backend, also
with a recorded reason.

`register(backend="cpu", name="fastgpt-cpu")` registers the same pair for an explicit backend.
"""
from __future__ import annotations

import functools
import sys
import warnings

import torch
import transformers

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, and_masks,
                                            causal_mask_function, sliding_window_overlay)
    from transformers.modeling_utils import AttentionInterface
except ImportError as error:  # both interfaces exist from transformers 4.53 on
    raise ImportError(f"fastgpt.hf needs transformers >= 4.53 (AttentionInterface and AttentionMaskInterface); "
                      f"transformers {transformers.__version__} is installed ({error})") from error

from . import backends, ops
from .backends import check_backend_name

# Keyword arguments some models pass that change the attention itself and that fastgpt.attention
# has no counterpart for: T5-style position bias, attention sinks (gpt-oss's s_aux). (`sliding_window`
# and `softcap` it runs, as window= and softcap=.)
_UNSUPPORTED_KWARGS = ("position_bias", "s_aux", "sinks")
REGISTERED: set[str] = set()  # attn_implementation names that run fastgpt (see fastgpt.patch)
FALLBACKS: set[str] = set()  # why calls ran transformers' sdpa instead, including calls under torch.compile
_warned: set[str] = set()


def _fall_back(reason: str, instead: str = "transformers' sdpa attention") -> None:
    """Records (and, outside torch.compile, warns once about) a call that runs `instead`."""
    FALLBACKS.add(reason)
    # A warning inside a compiled region would break the graph (an error under fullgraph=True),
    # so compiled calls are only recorded in FALLBACKS.
    if not torch.compiler.is_compiling() and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastgpt.hf: {reason}; these calls run {instead} instead", RuntimeWarning, stacklevel=3)


# The code objects of transformers' and_masks(...) and sliding_window_overlay(W) closures: how a
# mask function built from them is told apart from any other (they are closures, not classes).
_AND_CODE = and_masks(causal_mask_function).__code__
_WINDOW_CODE = sliding_window_overlay(1).__code__


def _closure(function) -> dict:
    names, cells = function.__code__.co_freevars, function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(names, cells)}


def _causal_window(mask_function) -> tuple[bool, int | None] | None:
    """(True, W or None) for transformers' causal mask function, alone or and-ed with sliding
    window overlays (sliding_window_causal_mask_function(W): keys p - W < j <= p), W the
    narrowest window; None for any other pattern (it keeps the sdpa mask)."""
    if mask_function is causal_mask_function:
        return True, None
    code = getattr(mask_function, "__code__", None)
    if code is _WINDOW_CODE:
        window = _closure(mask_function).get("sliding_window")
        return (False, window) if isinstance(window, int) and not isinstance(window, bool) and window >= 1 else None
    if code is _AND_CODE:
        parts = [_causal_window(part) for part in _closure(mask_function).get("mask_functions", ())]
        if not parts or any(part is None for part in parts):
            return None
        windows = [window for _, window in parts if window is not None]
        return any(causal for causal, _ in parts), min(windows) if windows else None
    return None


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

    Causal attention (plain, or with transformers' sliding window: the window is not part of
    what this returns, the attention function applies it from the model's `sliding_window`
    keyword) over keys at positions [kv_offset, kv_offset + Tk) for queries at
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
    pattern = _causal_window(mask_function)
    local_size = kwargs.get("local_size")  # transformers passes the window here too, for sdpa's skip logic
    causal = (pattern is not None and pattern[0]
              and (pattern[1] is None or local_size is None or local_size == pattern[1]))
    if (causal and q_start is not None and kv_start is not None
            and kv_start <= q_start and q_start + q_length <= kv_start + kv_length):
        visible = q_start + q_length - kv_start  # Tk'
        if attention_mask is None:
            if visible == kv_length:
                return None
            device = kwargs.get("device", cache_position.device if cache_position is not None else "cpu")
            return torch.ones(batch_size, visible, dtype=torch.bool, device=device)
        keep = attention_mask.to(torch.bool)  # (B, seen + Tq): True = a real token
        if kv_start > 0 and keep.shape[-1] == visible:
            # Already ours, cut to the visible keys: for a compileable (static) cache, generate builds
            # the mask ahead of the forward, and a model without per-layer mask dicts (Mistral) hands
            # that back as its 2-D attention_mask. Read at absolute positions, transformers would pad
            # it with False and hide every key; it is the visible keys' padding, as flash's masks are.
            return keep.expand(batch_size, visible)
        missing = kv_start + visible - keep.shape[-1]
        if missing > 0:  # positions past the 2-D mask hold no token
            keep = torch.nn.functional.pad(keep, (0, missing), value=False)
        return keep[:, kv_start:kv_start + visible].expand(batch_size, visible)  # (B, Tk')
    sdpa_kwargs = dict(kwargs, allow_is_causal_skip=False)  # a None here would mean top-left causal
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=batch_size, kv_length=kv_length,
                                                mask_function=mask_function, attention_mask=attention_mask,
                                                kv_offset=kv_offset, **sdpa_kwargs)


def _eager_softcap_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """The fallback of a soft-capped call (transformers' sdpa refuses softcap): the model's own
    eager attention (Gemma 2's eager_attention_forward applies softcap), its mask made additive."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:  # no eager attention to defer to: sdpa, which raises its own clear error
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def fastgpt_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, *, backend: str = "auto", **kwargs):
    """transformers' attention function signature, on fastgpt.attention.

    query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) (Hq % Hkv == 0: grouped-query attention runs
    natively), attention_mask from `fastgpt_mask`; kwargs `sliding_window` (W keys per query,
    itself included) and `softcap` become window= and softcap=
    -> (attn_output (B, Tq, Hq, D), None): fused kernels return no attention weights.
    """
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    unsupported = [name for name in _UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    reason = None
    if unsupported:
        reason = f"fastgpt.attention has no {', '.join(unsupported)}"
    elif attention_mask is not None and not (attention_mask.dtype == torch.bool and attention_mask.dim() == 2
                                             and attention_mask.shape[-1] <= key.shape[2]):
        reason = (f"a {attention_mask.dim()}-D {str(attention_mask.dtype).replace('torch.', '')} attention mask "
                  f"of shape {tuple(attention_mask.shape)} cannot be expressed as causal + key padding")
    if attention_mask is None:  # no padding: causality as the module declares it (like transformers' sdpa)
        is_causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    else:  # fastgpt_mask returns a 2-D mask only for causal attention; keys past its length are invisible
        causal = True
    visible = key.shape[2] if attention_mask is None or reason is not None else attention_mask.shape[-1]  # Tk'
    if window is not None and int(window) >= visible:
        window = None  # W >= Tk: every key is inside the window (causal or not)
    if reason is None and window is not None and not causal:
        # transformers' bidirectional windows disagree on whether |i - j| = W is seen (<= in
        # masking_utils, < in Gemma 3): the sdpa mask, not the keyword, is the reference there
        reason = "a non-causal sliding window is left to the mask transformers builds"
    if reason is not None:
        if softcap is not None:
            _fall_back(reason, "the model's eager attention (transformers' sdpa has no softcap)")
            return _eager_softcap_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        _fall_back(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_mask is not None:
        key, value = key[:, :, :visible], value[:, :, :visible]  # (B, Hkv, Tk', D)
    window = None if window is None else int(window)
    softcap = None if softcap is None else float(softcap)
    if backend != "auto":
        # An explicit backend that runs the call except for a feature it does not implement (yet):
        # fastgpt's auto backend runs it instead, with a recorded reason (not an error mid-model).
        features = backends.attention_features(query.shape[1], key.shape[1], window, softcap)
        args = (backend, "attention", query.device, query.dtype, query.shape[-1])
        why = backends.refusal(*args, features)
        if why is not None and backends.refusal(*args) is None:
            _fall_back(f"backend={backend!r} cannot run this call: {why}", "fastgpt's auto backend")
            backend = "auto"
    # key/value (B, Hkv, Tk, D) as they are: grouped-query attention never repeats them
    out = ops.attention(query, key, value, causal=causal, key_padding_mask=attention_mask, window=window,
                        softcap=softcap, dropout_p=dropout, scale=scaling, backend=backend)  # (B, Hq, Tq, D)
    return out.transpose(1, 2), None  # (B, Tq, Hq, D), as transformers' attention functions return


def register(backend: str = "auto", name: str = "fastgpt") -> str:
    """Register attn_implementation=`name` running fastgpt.attention on `backend`; returns `name`."""
    check_backend_name(backend)
    AttentionInterface.register(name, functools.partial(fastgpt_attention_forward, backend=backend))
    AttentionMaskInterface.register(name, fastgpt_mask)
    REGISTERED.add(name)
    return name


register()
