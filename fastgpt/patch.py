"""patch(model) / unpatch(model): slot fastgpt's fused modules into an existing model in place,
and take them out again.

patch() swaps the layer norms, RMS norms and book-style attention modules of a model for fastgpt.nn's,
keeping the very same Parameter objects (so an optimizer built before the patch keeps
working), and only where a probe proves the swap computes what the original computed; it
reports what it swapped and what it left alone, and why. unpatch() puts the originals back,
so the model's state_dict loads into the class it was built from.
"""
from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import check_backend_name
from .nn import _QKV, CausalAttention, GroupedQueryAttention, LayerNorm, MultiHeadAttention, RMSNorm

# Attribute of a swapped-in module holding the module it replaced. Set in the instance __dict__,
# not as a submodule, so the original stays out of state_dict(), modules() and .to().
_ORIGINAL = "_fastgpt_original"

# Longest probe of an attention module whose context length is larger or unknown. The probe runs the
# original's own forward, often the book's T×T matmul attention, in both modes: cost and memory grow
# with T². 1024 tokens is the whole context of GPT-2 and of the book's GPT configs, so there a window
# or any other length-dependent behaviour is checked over every length the model can be given;
# beyond 1024 tokens the equivalence is proven up to 1024 tokens only.
_PROBE_MAX_TOKENS = 1024

# Largest max |new - old| (relative to max |old|, at least 1) for which a probed module counts as
# computing the same function. Kernel rounding is far below these; a different function (RMS norm,
# non-causal or differently scaled attention) is off by O(0.1 .. 1).
_PROBE_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# Class names (lower case) that make a module worth a line in the report even when patch()
# does not recognise its structure.
_LOOKS_LIKE = ("attention", "norm", "mha")


@dataclass
class PatchReport:
    """What patch() did, one row per module it recognised or that looks like an attention or norm:
    `swapped` (name, old type, new type); `retargeted` (name, type): fastgpt modules whose backend
    was set; `native` (name, type, how): modules that already run fastgpt's kernels, kept as they
    are; `left` (name, type, reason): modules not swapped, with the reason.
    `restore()` undoes this patch (see unpatch)."""
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    retargeted: list[tuple[str, str]] = field(default_factory=list)
    native: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    _swaps: list[tuple[nn.Module, str, str, nn.Module]] = field(default_factory=list, repr=False, compare=False)

    def restore(self) -> UnpatchReport:
        """Put back the original of every module this patch swapped that is still in place (see unpatch)."""
        return _restore(self._swaps)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)}, backend set on {len(self.retargeted)}, "
                 f"already fastgpt {len(self.native)}, left {len(self.left)}"]
        lines += [f"  swapped  {name}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  backend  {name}: {kind}" for name, kind in self.retargeted]
        lines += [f"  fastgpt  {name}: {kind} ({how})" for name, kind, how in self.native]
        lines += [f"  left     {name}: {kind} ({reason})" for name, kind, reason in self.left]
        return "\n".join(lines)


@dataclass
class UnpatchReport:
    """What unpatch() / PatchReport.restore() did: `restored` (name, fastgpt type, original type)."""
    restored: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"restored {len(self.restored)}"]
        lines += [f"  restored {name}: {new} -> {old}" for name, new, old in self.restored]
        return "\n".join(lines)


def _type_name(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _adopt_training(module: nn.Module, like: nn.Module) -> None:
    """Give the submodules of `module` that it does not share with `like` the training flag of `like`
    (the shared ones, Linear and Dropout, already carry the model's own flags)."""
    shared = {id(m) for m in like.modules()}
    for m in module.modules():
        if id(m) not in shared:
            m.training = like.training


def _plain_signature(function) -> str:
    signature = inspect.signature(function)
    return str(signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                 return_annotation=signature.empty))


def _interface_mismatch(old: nn.Module, new: nn.Module) -> str | None:
    """Why code written against `old` could not call `new` the same way (None when it can): every
    parameter of old's forward must open new's, in order, with the same kind and default (new may add
    more, if they have defaults), and `old` may have no public method `new` lacks (reset_cache, ...)."""
    old_params = list(inspect.signature(old.forward).parameters.values())
    new_params = list(inspect.signature(new.forward).parameters.values())
    key = lambda p: (p.name, p.kind, p.default)  # noqa: E731
    if [key(p) for p in old_params] != [key(p) for p in new_params[:len(old_params)]] or any(
            p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in new_params[len(old_params):]):
        extra = [p.name for p in old_params if p.name not in {q.name for q in new_params}]
        what = f"also takes {', '.join(extra)}" if extra else "is called differently"
        return (f"its forward{_plain_signature(old.forward)} {what}; fastgpt's is "
                f"forward{_plain_signature(new.forward)}")
    module_api = set(dir(nn.Module))
    methods = [name for name in dir(type(old)) if not name.startswith("_") and name not in module_api
               and callable(getattr(type(old), name)) and not hasattr(new, name)]
    if methods:
        return f"it has methods fastgpt's module lacks: {', '.join(methods)}"
    return None


def _compare(old: nn.Module, new: nn.Module, example: torch.Tensor | tuple) -> str | None:
    args = example if isinstance(example, tuple) else (example,)
    try:
        want = old(*args)
    except Exception as error:  # a module that cannot run the probe is not proven equal: leave it
        return f"its forward raised {type(error).__name__}: {error}"
    try:
        got = new(*args)
    except Exception as error:
        return f"the fused module raised {type(error).__name__}: {error}"
    if not isinstance(want, torch.Tensor):
        return f"it returns a {type(want).__name__}, the fused module a Tensor"
    if got.shape != want.shape:
        return f"it returns shape {tuple(want.shape)}, the fused module {tuple(got.shape)}"
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    tol = _PROBE_RTOL.get(want.dtype, 1e-4) * scale
    if not err <= tol:
        return f"its output differs from the fused module's by {err:.2e} (> {tol:.1e})"
    return None


def _probe_mismatch(old: nn.Module, new: nn.Module, examples: list) -> str | None:
    """Why `new` is not a faithful replacement of `old` on the probe inputs (None when it is).
    An example is the input tensor, or the tuple of forward's arguments (x first).

    Both run without grad on every example in eval mode, then in train mode with every dropout
    probability at 0: their dropouts draw from different RNGs (torch's, fastgpt's Philox) and
    cannot agree bit for bit, but with p = 0 whatever else training changes is compared. Dropout
    probabilities, every submodule's training flag and torch's global RNG state are restored."""
    first = examples[0][0] if isinstance(examples[0], tuple) else examples[0]
    if first.device.type == "meta":
        return None  # no data to compare: the structural checks stand alone
    modules = list({id(m): m for m in (*old.modules(), *new.modules())}.values())
    flags = [(m, m.training) for m in modules]
    rates = [(m, "p", m.p) for m in modules if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates += [(m, "dropout", m.dropout) for m in (old, new) if isinstance(getattr(m, "dropout", None), float)]
    devices = [first.device] if first.device.type == "cuda" else []
    try:
        # An original whose forward draws random numbers must not move the caller's RNG streams.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m, attribute, _ in rates:
                setattr(m, attribute, 0.0)
            for training in (False, True):
                old.train(training), new.train(training)
                for example in examples:
                    why = _compare(old, new, example)
                    if why:
                        mode = "train mode, dropout off" if training else "eval mode"
                        tokens = (example[0] if isinstance(example, tuple) else example).shape[-2]
                        return f"on a probe input of {tokens} token{'s' * (tokens != 1)} ({mode}) {why}"
    finally:
        for m, training in flags:
            m.training = training
        for m, attribute, rate in rates:
            setattr(m, attribute, rate)
    return None


def _probe_input(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)  # leaves torch's global RNG alone
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _attention_probes(d_in: int, context_length: int | None, like: torch.Tensor) -> list[torch.Tensor]:
    """Probe inputs (B, T, d_in): one token, a few (odd, so no kernel tile is full), and the whole
    context (a hidden window or length limit shows only there), capped at _PROBE_MAX_TOKENS."""
    longest = min(context_length or _PROBE_MAX_TOKENS, _PROBE_MAX_TOKENS)
    lengths = sorted({1, min(7, longest), longest})
    return [_probe_input((2 if tokens < longest else 1, tokens, d_in), like) for tokens in lengths]


def _verified(old: nn.Module, new: nn.Module, examples: list, what: str) -> tuple[nn.Module | None, str]:
    """`new` with `old`'s training flags when it can stand in for `old`, else None and why not."""
    _adopt_training(new, old)
    why = _interface_mismatch(old, new) or _probe_mismatch(old, new, examples)
    return (None, f"not {what}: {why}") if why else (new, "")


def _book_layer_norm(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """A fastgpt LayerNorm sharing the book LayerNorm's scale/shift Parameters, or None and why not."""
    scale, shift, eps = getattr(module, "scale", None), getattr(module, "shift", None), getattr(module, "eps", None)
    if not (isinstance(scale, nn.Parameter) and isinstance(shift, nn.Parameter) and isinstance(eps, float)):
        return None, "a LayerNorm without the book's `scale`, `shift` Parameters and float `eps`"
    if scale.dim() != 1 or scale.shape != shift.shape:
        return None, f"scale {tuple(scale.shape)} / shift {tuple(shift.shape)} are not (C,) vectors"
    new = LayerNorm(scale.shape[0], eps=eps, device="meta", backend=backend)
    new.weight, new.bias = scale, shift
    return _verified(module, new, [_probe_input((2, 3, scale.shape[0]), scale)], "a layer norm over the last dim")


def _torch_layer_norm(module: nn.LayerNorm, backend: str) -> tuple[nn.Module | None, str]:
    if len(module.normalized_shape) != 1:
        return None, (f"normalises over {len(module.normalized_shape)} dims {tuple(module.normalized_shape)}; "
                      f"fastgpt normalises over the last dim only")
    new = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                    bias=module.bias is not None, device="meta", backend=backend)
    new.weight, new.bias = module.weight, module.bias
    _adopt_training(new, module)
    return new, ""


def _causal_mask_length(module: nn.Module) -> tuple[int | None, str | None]:
    """(T, None) for the book's causal `mask` buffer triu(ones(T, T), 1); (None, None) without one;
    (None, why) for a `mask` that is something else."""
    mask = getattr(module, "mask", None)
    if not isinstance(mask, torch.Tensor):
        return None, None
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or (mask.device.type != "meta" and not torch.equal(
            mask.bool(), torch.ones_like(mask, dtype=torch.bool).triu(diagonal=1))):
        return None, "its `mask` buffer is not the book's causal triu(ones(T, T), diagonal=1)"
    return mask.shape[-1], None


def _book_attention(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """A fastgpt attention module reusing the book module's Linear and Dropout submodules, or None and why not."""
    W_query, W_key, W_value = (getattr(module, name) for name in _QKV)
    if not all(isinstance(w, nn.Linear) for w in (W_query, W_key, W_value)):
        return None, "W_query / W_key / W_value are not all nn.Linear"
    d_in, d_out = W_query.in_features, W_query.out_features
    if any((w.in_features, w.out_features) != (d_in, d_out) for w in (W_key, W_value)):
        return None, "W_query, W_key and W_value differ in shape"
    dropout = getattr(module, "dropout", None)
    if not isinstance(dropout, nn.Dropout):
        return None, "no `dropout` nn.Dropout module (the book's attention-weight dropout)"
    context_length, why = _causal_mask_length(module)
    if why:
        return None, why
    if context_length is None:
        if getattr(module, "causal", None) is not True:
            return None, "no causal `mask` buffer and no `causal = True`: not a causal self-attention"
        context_length = getattr(module, "context_length", None)
    qkv_bias = W_query.bias is not None
    out_proj, num_heads = getattr(module, "out_proj", None), getattr(module, "num_heads", None)
    if out_proj is None and num_heads is None:
        new = CausalAttention(d_in, d_out, context_length or 0, dropout.p, qkv_bias, backend=backend, device="meta")
    elif isinstance(out_proj, nn.Linear) and isinstance(num_heads, int) and num_heads > 0 and d_out % num_heads == 0 \
            and (out_proj.in_features, out_proj.out_features) == (d_out, d_out):
        new = MultiHeadAttention(d_in, d_out, context_length or 0, dropout.p, num_heads, qkv_bias, backend=backend,
                                 device="meta")
        new.out_proj = out_proj
    else:
        return None, "has W_query/W_key/W_value but not the book's out_proj (d_out -> d_out) and int num_heads"
    new.W_query, new.W_key, new.W_value, new.dropout = W_query, W_key, W_value, dropout
    examples = _attention_probes(d_in, context_length, W_query.weight)
    return _verified(module, new, examples, "the book's causal attention")


def _fused_qkv_attention(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """fastgpt's MultiHeadAttention(fused_qkv=True) on the `qkv` / `proj` Linears of the book's bonus
    attentions (MultiHeadAttentionCombinedQKV, MHAPyTorchScaledDotProduct, GPTModelFast's), or None and
    why not. Their qkv rows split as (3, num_heads, head_dim), W_qkv's as [query; key; value] of
    (num_heads, head_dim) each: the same rows. Causality may live only in their forward
    (is_causal=True), so the probe is what decides."""
    qkv, proj, num_heads = module.qkv, module.proj, getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None, "`qkv` / `proj` are not both nn.Linear"
    d_in, d_out = qkv.in_features, qkv.out_features // 3
    if qkv.out_features != 3 * d_out or (proj.in_features, proj.out_features) != (d_out, d_out):
        return None, f"qkv ({d_in} -> {qkv.out_features}) and proj are not d_in -> 3 * d_out and d_out -> d_out"
    if not (isinstance(num_heads, int) and num_heads > 0 and d_out % num_heads == 0
            and getattr(module, "head_dim", d_out // num_heads) == d_out // num_heads):
        return None, f"no int `num_heads` dividing d_out ({d_out}) into `head_dim`"
    dropout = getattr(module, "dropout", 0.0)
    if isinstance(dropout, float) and 0.0 <= dropout < 1.0:
        dropout = nn.Dropout(dropout)
    if not isinstance(dropout, nn.Dropout):
        return None, "its `dropout` is neither an nn.Dropout nor a probability"
    context_length, why = _causal_mask_length(module)
    if why:
        return None, why
    context_length = context_length or getattr(module, "context_length", None)
    examples = _attention_probes(d_in, context_length, qkv.weight)
    # Without a declared context, the longest length the probe proved stands in for it.
    new = MultiHeadAttention(d_in, d_out, context_length or examples[-1].shape[-2], dropout.p, num_heads,
                             qkv.bias is not None, backend=backend, fused_qkv=True, device="meta")
    new.W_qkv, new.out_proj, new.dropout = qkv, proj, dropout
    return _verified(module, new, examples, "a causal attention on the book's fused qkv")


# ---- RMS norms -----------------------------------------------------------------------------

def _torch_rms_norm(module: nn.RMSNorm, backend: str) -> tuple[nn.Module | None, str]:
    if len(module.normalized_shape) != 1:
        return None, (f"normalises over {len(module.normalized_shape)} dims {tuple(module.normalized_shape)}; "
                      f"fastgpt normalises over the last dim only")
    new = RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                  device="meta", backend=backend)
    new.weight = module.weight
    C = module.normalized_shape[0]
    like = module.weight if module.weight is not None else torch.empty(0)
    return _verified(module, new, [_probe_input((2, 3, C), like)], "an RMS norm over the last dim")


def _book_rms_norm(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """A fastgpt RMSNorm sharing the weight of an RMSNorm written as the book (`scale`, `eps`) or
    transformers (`weight`, `eps` / `variance_epsilon`) write them, x̂ · w or Gemma's x̂ · (1 + w):
    the probe decides which offset (0 or 1), or None and why not."""
    weight = getattr(module, "scale", None)
    weight = weight if isinstance(weight, nn.Parameter) else getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, float)):
        return None, "an RMS norm without a (C,) `scale` or `weight` Parameter and a float `eps`"
    if getattr(module, "shift", None) is not None or getattr(module, "bias", None) is not None:
        return None, "it adds a shift (bias) after the scale; fastgpt.rms_norm has none"
    examples = [_probe_input((2, 3, weight.shape[0]), weight)]
    why = ""
    for offset in (0.0, 1.0):
        new = RMSNorm(weight.shape[0], eps=eps, offset=offset, device="meta", backend=backend)
        new.weight = weight
        swapped, why = _verified(module, new, examples, f"x * rsqrt(mean(x²) + eps) * ({offset:g} + weight)")
        if swapped is not None:
            return swapped, ""
    return None, why


# ---- the book's later attention interfaces ----------------------------------------------------
# The book's Llama 3 / Qwen 3 / Gemma 3 attentions take forward(x, mask, cos, sin) from their model;
# its chapter-4 KV-cache attentions (ch04/03_kv-cache, 04_gqa, 06_swa) keep their own cache behind
# forward(x, use_cache=False) and reset_cache(). These subclasses of fastgpt.nn's attention have those
# interfaces, so that patch() can put them where the book's modules were.

def _mask_window(mask: torch.Tensor, T: int) -> tuple[bool, int | None]:
    """(True, window) when `mask` (bool, True = hidden), cut to its first (T, T) block as the book's
    Llama 3 does, is causal attention with that sliding window (None: plain causal): query i hides
    exactly the keys j > i and j <= i - window. (False, None) for any other mask."""
    if mask.dtype != torch.bool or mask.dim() < 2 or any(n != 1 for n in mask.shape[:-2]) \
            or mask.shape[-2] < T or mask.shape[-1] < T:
        return False, None
    hidden = mask.reshape(mask.shape[-2:])[:T, :T]
    seen = T - int(hidden[-1].sum())  # keys the last query sees: min(T, window)
    if seen < 1:
        return False, None
    positions = torch.arange(T, device=mask.device)
    behind = positions[:, None] - positions[None, :]
    if not torch.equal(hidden, (behind < 0) | (behind >= seen)):
        return False, None
    return True, (None if seen >= T else seen)


class _MaskVerdicts:
    """_mask_window of the masks seen lately: a model hands the same mask tensor to every layer, so
    the (T, T) comparison runs once per forward, not once per layer. Keyed by the tensor itself (a
    weak reference, its version counter and T): a new or modified mask is checked again."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, {}

    def __call__(self, mask: torch.Tensor, T: int) -> tuple[bool, int | None]:
        entry = self.entries.get(id(mask))
        if entry is not None and entry[0]() is mask and entry[1:3] == (mask._version, T):
            return entry[3]
        verdict = _mask_window(mask, T)
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[id(mask)] = (weakref.ref(mask), mask._version, T, verdict)
        return verdict


_MASK_VERDICTS = _MaskVerdicts()
_warned: set[str] = set()


class BookRopeAttention(GroupedQueryAttention):
    """fastgpt's grouped-query attention behind the book's forward(x, mask, cos, sin) (Llama 3,
    Qwen 3, Gemma 3): RoPE from the model's (context, head_dim) tables cut to T, causality and the
    sliding window read off the boolean mask (True = hidden). A mask that is not causal attention
    with a window runs the replaced module instead, with a warning: never a different result."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        causal, window = _MASK_VERDICTS(mask, T)
        if not causal:
            original = vars(self).get(_ORIGINAL)
            if original is None:
                raise ValueError("fastgpt BookRopeAttention: mask must be causal, with or without a sliding "
                                 f"window (True = hidden, as the book builds it), got shape {tuple(mask.shape)}")
            key = f"{type(original).__name__}: mask"
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"fastgpt.patch: a {type(original).__name__} got a mask that is not causal with a "
                              "sliding window; such calls run the original module", RuntimeWarning, stacklevel=2)
            return original(x, mask, cos, sin)
        q, k, v = self.project(x, (cos[:T], sin[:T]))
        return self.attend(q, k, v, window)


class BookCachedAttention(MultiHeadAttention):
    """fastgpt's attention behind the book's KV-cache interface (ch04/03_kv-cache, 04_gqa, 06_swa):
    forward(x, use_cache=False) and reset_cache(). A cached call appends its keys and values (the
    num_kv_groups heads, never repeated) to cache_k / cache_v (B, Hkv, T, head_dim) and attends to
    all of them; with a `sliding_window_size` W the attention sees the last W keys of each query
    and the cache keeps only the last W (what the next call can still see), as ch04/06_swa's does.
    An uncached call attends to its own tokens only and leaves the cache alone. The book's variants
    differ on what a cached call means right after an uncached one (ch04/04_gqa starts afresh,
    ch04/03 continues): that call raises until reset_cache(), as every book generate function does
    first."""

    def __init__(self, *args, sliding_window_size: int | None = None, **options):
        super().__init__(*args, **options)
        self.sliding_window_size = sliding_window_size
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.ptr_current_pos = 0
        self._uncached_since_cache = False

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        window = self.sliding_window_size
        q, k, v = self.project(x)
        if not use_cache:
            self._uncached_since_cache = self.cache_k is not None
            return self.attend(q, k, v, window)
        if self._uncached_since_cache:
            raise RuntimeError("fastgpt BookCachedAttention: a cached call after an uncached one; call "
                               "reset_cache() (the model's reset_kv_cache()) before generating again")
        if self.cache_k is not None:
            k, v = torch.cat([self.cache_k, k], dim=2), torch.cat([self.cache_v, v], dim=2)
        keep = k.shape[2] if window is None else min(k.shape[2], window)
        self.cache_k, self.cache_v = k[:, :, -keep:], v[:, :, -keep:]
        self.ptr_current_pos += x.shape[1]
        return self.attend(q, k, v, window)

    def reset_cache(self) -> None:
        self.cache_k = self.cache_v = None
        self.ptr_current_pos = 0
        self._uncached_since_cache = False


def _forward_parameters(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _projections(module: nn.Module) -> tuple[tuple[nn.Linear, ...], int, int, int] | str:
    """(W_query, W_key, W_value, out_proj), num_heads, num_kv_groups, head_dim of a book attention
    module, or why it does not have them."""
    linears = tuple(getattr(module, name, None) for name in (*_QKV, "out_proj"))
    if not all(isinstance(w, nn.Linear) for w in linears):
        return "W_query / W_key / W_value / out_proj are not all nn.Linear"
    num_heads = getattr(module, "num_heads", None)
    num_kv_groups = getattr(module, "num_kv_groups", num_heads)
    if not (isinstance(num_heads, int) and isinstance(num_kv_groups, int) and num_kv_groups > 0
            and num_heads % num_kv_groups == 0):
        return "no int num_heads that is a multiple of an int num_kv_groups"
    W_query, W_key, W_value, out_proj = linears
    head_dim = W_query.out_features // num_heads
    d_in = W_query.in_features
    if W_query.out_features != num_heads * head_dim or any(
            (w.in_features, w.out_features) != (d_in, num_kv_groups * head_dim) for w in (W_key, W_value)) \
            or out_proj.in_features != num_heads * head_dim or getattr(module, "head_dim", head_dim) != head_dim:
        return (f"W_query ({d_in} -> {W_query.out_features}), W_key / W_value and out_proj are not the shapes of "
                f"{num_heads} query and {num_kv_groups} key/value heads")
    if (W_query.bias is None) != (W_key.bias is None) or (W_key.bias is None) != (W_value.bias is None):
        return "W_query, W_key and W_value do not all have (or all lack) a bias"
    return linears, num_heads, num_kv_groups, head_dim


def _share(new: nn.Module, linears: tuple[nn.Linear, ...]) -> None:
    new.W_query, new.W_key, new.W_value, new.out_proj = linears


def _norm_of(module: nn.Module | None, backend: str) -> nn.Module | None:
    """QK-norm of a book attention: fastgpt's RMSNorm when it can stand in, else the module itself."""
    if module is None:
        return None
    new, _ = _replacement(module, backend)
    return module if new is None else new


def _book_rope_attention(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    found = _projections(module)
    if isinstance(found, str):
        return None, found
    linears, num_heads, num_kv_groups, head_dim = found
    if head_dim % 2:
        return None, f"head_dim {head_dim} is odd: RoPE rotates pairs"
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return None, "it has only one of q_norm / k_norm"
    d_in = linears[0].in_features
    new = BookRopeAttention(d_in, num_heads, num_kv_groups, head_dim, qkv_bias=linears[0].bias is not None,
                            context_length=getattr(module, "context_length", None), backend=backend, device="meta")
    _share(new, linears)
    new.d_out = linears[3].out_features
    new.q_norm, new.k_norm = _norm_of(q_norm, backend), _norm_of(k_norm, backend)
    scaling = getattr(module, "scaling", None)  # Gemma 3: query_pre_attn_scalar ** -0.5
    if isinstance(scaling, float):
        new.scale = scaling
    like = linears[0].weight
    T = 37
    angles = torch.arange(T)[:, None] * 10_000 ** (-torch.arange(0, head_dim, 2) / head_dim)[None, :]
    angles = torch.cat([angles, angles], dim=1).to(like.device)
    cos, sin = angles.cos(), angles.sin()
    causal = torch.ones(T, T, dtype=torch.bool, device=like.device).triu(diagonal=1)
    sliding = causal | torch.ones_like(causal).triu(diagonal=5).T  # a window of 5
    examples = [(_probe_input((2, tokens, d_in), like), mask[:tokens, :tokens], cos, sin)
                for tokens, mask in ((1, causal), (7, causal), (T, causal), (T, sliding))]
    return _verified(module, new, examples, "the book's RoPE attention (causal mask, optional window)")


def _cache_mismatch(old: nn.Module, new: BookCachedAttention, d_in: int, like: torch.Tensor) -> str | None:
    """Why the cached calls of `new` differ from `old`'s (None when they agree): a prompt of 5
    tokens, then 1, then 3 more, each through forward(x, use_cache=True), in eval mode. Both caches
    are emptied afterwards (patch() only probes modules with an empty cache)."""
    if like.device.type == "meta":
        return None
    prompt = _probe_input((2, 9, d_in), like)
    training = (old.training, new.training)
    try:
        old.eval(), new.eval()
        old.reset_cache(), new.reset_cache()
        with torch.no_grad():
            for start, stop in ((0, 5), (5, 6), (6, 9)):
                why = _compare(lambda x: old(x, use_cache=True), lambda x: new(x, use_cache=True),
                               prompt[:, start:stop])
                if why:
                    return f"after {start} cached tokens, {stop - start} more: {why}"
    finally:
        old.reset_cache(), new.reset_cache()
        old.train(training[0]), new.train(training[1])
    return None


def _book_cached_attention(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    found = _projections(module)
    if isinstance(found, str):
        return None, found
    linears, num_heads, num_kv_groups, head_dim = found
    if not callable(getattr(module, "reset_cache", None)):
        return None, "its forward takes use_cache but it has no reset_cache()"
    if getattr(module, "cache_k", None) is not None:
        return None, "its KV cache holds tokens: patch between generations (after reset_cache())"
    dropout = getattr(module, "dropout", None)
    if not isinstance(dropout, nn.Dropout):
        return None, "no `dropout` nn.Dropout module (the book's attention-weight dropout)"
    window = getattr(module, "sliding_window_size", None)
    if not (window is None or (isinstance(window, int) and window >= 1)):
        return None, f"sliding_window_size must be None or an int >= 1, got {window!r}"
    context_length, why = _causal_mask_length(module)
    if why:
        return None, why
    d_in, d_out = linears[0].in_features, linears[3].out_features
    new = BookCachedAttention(d_in, d_out, context_length or 0, dropout.p, num_heads, linears[0].bias is not None,
                              num_kv_groups=num_kv_groups, head_dim=head_dim, out_bias=linears[3].bias is not None,
                              sliding_window_size=window, backend=backend, device="meta")
    _share(new, linears)
    new.dropout = dropout
    like = linears[0].weight
    what = "the book's KV-cache attention"
    swapped, why = _verified(module, new, _attention_probes(d_in, context_length, like), what)
    if swapped is not None:  # the uncached calls agree (and so does the interface): now the cached ones
        why = _cache_mismatch(module, new, d_in, like)
        why = f"not {what}: {why}" if why else ""
    return (None if why else swapped), why


def _fastgpt_native(module: nn.Module) -> str | None:
    """How `module` already runs fastgpt's kernels (a transformers attention whose attn_implementation
    fastgpt.hf registered), or None."""
    kind = type(module)
    if not (kind.__module__.startswith("transformers.") and "attention" in kind.__name__.lower()):
        return None
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    hf = sys.modules.get("fastgpt.hf")  # imported only by those who use it (it imports transformers)
    if hf is not None and implementation in hf.REGISTERED:
        return f"runs fastgpt.attention: attn_implementation={implementation!r}"
    return None


def _replacement(module: nn.Module, backend: str) -> tuple[nn.Module | None, str | None]:
    """(fused replacement, None) | (None, reason it is left) | (None, None) when not a candidate."""
    kind = type(module)
    name = kind.__name__.lower()
    if kind is nn.LayerNorm:
        return _torch_layer_norm(module, backend)
    if isinstance(module, nn.LayerNorm):
        return None, "a subclass of torch.nn.LayerNorm: its forward may differ from layer norm"
    if isinstance(module, nn.MultiheadAttention):
        return None, ("torch.nn.MultiheadAttention is not supported (masks and causality come per call); "
                      "use fastgpt.nn.MultiHeadAttention or fastgpt.attention")
    if kind is nn.RMSNorm:
        return _torch_rms_norm(module, backend)
    if isinstance(module, nn.RMSNorm):
        return None, "a subclass of torch.nn.RMSNorm: its forward may differ from RMS norm"
    if name.endswith("rmsnorm"):
        return _book_rms_norm(module, backend)
    if kind.__name__ == "LayerNorm":
        return _book_layer_norm(module, backend)
    if all(hasattr(module, attribute) for attribute in _QKV):
        parameters = _forward_parameters(module)
        if parameters == ["x", "mask", "cos", "sin"]:
            return _book_rope_attention(module, backend)
        if parameters == ["x", "use_cache"]:
            return _book_cached_attention(module, backend)
        return _book_attention(module, backend)
    if hasattr(module, "qkv") and hasattr(module, "proj"):
        return _fused_qkv_attention(module, backend)
    if hasattr(module, "W_query") or hasattr(module, "qkv") or any(word in name for word in _LOOKS_LIKE):
        if kind.__module__.startswith("transformers.") and "attention" in name:
            return None, ("an attention module fastgpt does not recognise (a transformers model: use "
                          "attn_implementation='fastgpt' after `import fastgpt.hf`)")
        return None, ("looks like an attention or norm module, but fastgpt does not recognise its structure "
                      "(its submodules are checked on their own)")
    return None, None


def _is_fastgpt_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastgpt.") and isinstance(getattr(module, "backend", None), str)


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Swap, in place, the layer norms and causal self-attention modules of `model` for fastgpt's
    fused ones running on `backend`, where that provably changes no result; return a PatchReport.

    Candidates, recognised by structure:
    - torch.nn.LayerNorm over the last dim -> fastgpt.nn.LayerNorm (exact class only: a subclass is left);
    - the book's LayerNorm (class named LayerNorm with `scale`, `shift`, float `eps`) -> fastgpt.nn.LayerNorm;
    - the book's MultiHeadAttention (W_query/W_key/W_value, out_proj, int num_heads, nn.Dropout
      `dropout`, causal `mask` buffer or `causal = True`) -> fastgpt.nn.MultiHeadAttention, and its
      CausalAttention (no out_proj / num_heads) -> fastgpt.nn.CausalAttention;
    - the book's fused-QKV attentions (`qkv` Linear d_in -> 3*d_out split as (3, heads, head_dim),
      `proj` Linear, num_heads, `dropout` float or nn.Dropout, optional causal `mask`: the chapter 3
      bonus MultiHeadAttentionCombinedQKV / MHAPyTorchScaledDotProduct, ch05's GPTModelFast) ->
      fastgpt.nn.MultiHeadAttention(fused_qkv=True) with W_qkv = qkv and out_proj = proj;
    - the book's RoPE attentions (Llama 3, Qwen 3, Gemma 3: forward(x, mask, cos, sin), grouped
      W_key/W_value, optional q_norm/k_norm, Gemma's `scaling`) -> BookRopeAttention, which reads
      causality and the sliding window off each call's mask (any other mask runs the original);
    - the book's KV-cache attentions (ch04/03_kv-cache, 04_gqa, 06_swa: forward(x, use_cache=False),
      reset_cache(), optional num_kv_groups and sliding_window_size) -> BookCachedAttention, probed
      on cached calls too; one whose cache holds tokens is left;
    - torch.nn.RMSNorm and RMS norms as the book and transformers write them (`scale` or `weight`,
      `eps` or `variance_epsilon`, x̂ · w or Gemma's x̂ · (1 + w), decided by the probe) ->
      fastgpt.nn.RMSNorm; one with a shift (bias) is left;
    - fastgpt's own modules (already fused) get `backend` set: patching twice never double-wraps.

    A candidate other than torch.nn.LayerNorm is swapped only when (1) every call its forward
    accepts, fastgpt's accepts too: its parameters open fastgpt's forward in order, with the same
    kinds and defaults (fastgpt's may add defaulted ones, such as kv_cache=None), and it has no
    public method the replacement lacks; and (2) a probe gives the same
    output: for attention, inputs of 1, 7 and the module's whole context (its `mask` size or
    `context_length`, at most _PROBE_MAX_TOKENS = 1024 tokens; 1024 without one), each in eval
    mode and in train mode with every dropout probability set to 0. A module whose forward raises
    on a probe is left. The probe uses its own torch.Generator and leaves torch's global RNG
    state, the dropout probabilities and every submodule's training flag as they were; on the
    meta device there is nothing to run and the structural checks decide alone.

    Replacements share the originals' submodules and Parameters (same device, dtype and identity:
    an optimizer keeps working) and take over each original's training flag, so a model patched in
    eval mode stays in eval mode. The patched model's state_dict uses fastgpt's names (the book's
    scale/shift become weight/bias, qkv/proj become W_qkv/out_proj, no `mask` buffers); it still
    loads a state_dict of the book's chapter 3/4 classes as is (fastgpt.nn takes scale/shift and
    ignores `mask`), not one with qkv/proj names. unpatch(model) or report.restore() puts the
    originals back, for a state_dict that loads strictly into the classes the model was built from.

    The report has a row for every module recognised, and for every module that looks like an
    attention or a norm (torch.nn.MultiheadAttention, RMSNorm, a class name containing
    attention / norm / mha, a W_query or qkv attribute): swapped, retargeted, already running
    fastgpt (a transformers attention with fastgpt.hf's attn_implementation), or left with the
    reason. Everything else is untouched. Every replacement is decided before any is made, so an
    error leaves `model` as it was; `model` itself, the root, is never replaced.
    """
    check_backend_name(backend)
    report = PatchReport()
    retargets: list[nn.Module] = []

    def visit(module: nn.Module, name: str, parent: nn.Module | None, attribute: str) -> None:
        if _is_fastgpt_module(module):
            retargets.append(module)
            report.retargeted.append((name or "<root>", _type_name(module)))
        elif (how := _fastgpt_native(module)) is not None:
            report.native.append((name or "<root>", _type_name(module), how))
        else:
            new, reason = _replacement(module, backend)
            if new is not None:
                if parent is None:
                    report.left.append(("<root>", _type_name(module),
                                        "the model itself cannot be replaced in place; build the fastgpt.nn module"))
                else:
                    object.__setattr__(new, _ORIGINAL, module)
                    report._swaps.append((parent, attribute, name, new))
                    report.swapped.append((name, _type_name(module), _type_name(new)))
                return
            if reason is not None:
                report.left.append((name or "<root>", _type_name(module), reason))
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, module, child_name)

    visit(model, "", None, "")
    for module in retargets:
        module.backend = backend
    for parent, attribute, _, new in report._swaps:
        setattr(parent, attribute, new)
    return report


def _restore(swaps: list[tuple[nn.Module, str, str, nn.Module]]) -> UnpatchReport:
    report = UnpatchReport()
    for parent, attribute, name, new in swaps:
        if parent._modules.get(attribute) is not new or _ORIGINAL not in vars(new):
            continue  # already restored, or replaced by someone else since
        original = vars(new).pop(_ORIGINAL)
        _adopt_training(original, new)
        # .to() / .double() after the patch reached only the replacement's tensors: the original's
        # own buffers (the book's mask) follow its Parameters, as they would have in an unpatched model.
        reference = next(new.parameters(), None)
        if reference is not None:
            for module in original.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        dtype = reference.dtype if buffer.is_floating_point() else buffer.dtype
                        module._buffers[key] = buffer.to(device=reference.device, dtype=dtype)
        setattr(parent, attribute, original)
        report.restored.append((name, _type_name(new), _type_name(original)))
    return report


def unpatch(model: nn.Module) -> UnpatchReport:
    """Put back, in place, every module that fastgpt.patch swapped in `model` (however often it was
    patched: the originals patch() first replaced), and return an UnpatchReport of what was restored.

    The originals come back with the Parameters the fastgpt modules shared with them, so trained
    weights carry over, with the replacements' training flags, and with their own buffers moved to
    their Parameters' device and floating dtype: `model.state_dict()` then loads with strict=True
    into a freshly built model of the original classes (the book's GPTModel). A model with nothing
    swapped by patch() (never patched, or already unpatched) is left as it is: the report's
    `restored` is empty.
    """
    swaps: list[tuple[nn.Module, str, str, nn.Module]] = []

    def visit(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            child_path = f"{name}.{child_name}" if name else child_name
            if _ORIGINAL in vars(child):
                swaps.append((module, child_name, child_path, child))
            else:
                visit(child, child_path)

    visit(model, "")
    return _restore(swaps)


__all__ = ["patch", "unpatch", "PatchReport", "UnpatchReport"]
