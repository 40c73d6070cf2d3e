"""patch(model): slot fastgpt's fused modules into an existing model, in place.

Swaps the layer norms and book-style attention modules of any model for fastgpt.nn's,
keeping the very same Parameter objects (so an optimizer built before the patch keeps
working), and reports what it swapped and what it left alone.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import check_backend_name
from .nn import _QKV, CausalAttention, LayerNorm, MultiHeadAttention

@dataclass
class PatchReport:
    """What patch() did: `swapped` (name, old type, new type), `retargeted` (name, type) for
    fastgpt modules whose backend was set, `left` (name, type, reason) for modules that look
    like a layer norm or attention but were not swapped."""
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    retargeted: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)}, backend set on {len(self.retargeted)}, left {len(self.left)}"]
        lines += [f"  swapped  {name}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  backend  {name}: {kind}" for name, kind in self.retargeted]
        lines += [f"  left     {name}: {kind} ({reason})" for name, kind, reason in self.left]
        return "\n".join(lines)


def _type_name(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


# Largest max |new - old| (relative to max |old|, at least 1) for which a probed module counts as
# computing the same function. Kernel rounding is far below these; a different function (RMS norm,
# non-causal or differently scaled attention) is off by O(0.1 .. 1).
_PROBE_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _probe_mismatch(old: nn.Module, new: nn.Module, example: torch.Tensor) -> str | None:
    """Why `new` is not a faithful replacement of `old` on `example` (None when it is).
    Both run in eval mode without grad; the modules' training flags are restored."""
    if example.device.type == "meta":
        return None  # no data to compare: the structural checks stand alone
    modes = old.training, new.training
    old.eval(), new.eval()
    try:
        with torch.no_grad():
            want, got = old(example), new(example)
    finally:
        old.train(modes[0]), new.train(modes[1])
    if got.shape != want.shape:
        return f"on a probe input it returns shape {tuple(want.shape)}, the fused module {tuple(got.shape)}"
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    tol = _PROBE_RTOL.get(want.dtype, 1e-4) * scale
    if not err <= tol:
        return f"on a probe input its output differs from the fused module's by {err:.2e} (> {tol:.1e})"
    return None


def _probe_input(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)  # leaves torch's global RNG alone
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _book_layer_norm(module: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """A fastgpt LayerNorm sharing the book LayerNorm's scale/shift Parameters, or None and why not."""
    scale, shift, eps = getattr(module, "scale", None), getattr(module, "shift", None), getattr(module, "eps", None)
    if not (isinstance(scale, nn.Parameter) and isinstance(shift, nn.Parameter) and isinstance(eps, float)):
        return None, "a LayerNorm without the book's `scale`, `shift` Parameters and float `eps`"
    if scale.dim() != 1 or scale.shape != shift.shape:
        return None, f"scale {tuple(scale.shape)} / shift {tuple(shift.shape)} are not (C,) vectors"
    new = LayerNorm(scale.shape[0], eps=eps, device="meta", backend=backend)
    new.weight, new.bias = scale, shift
    why = _probe_mismatch(module, new, _probe_input((2, 3, scale.shape[0]), scale))
    return (None, f"not a layer norm over the last dim: {why}") if why else (new, "")


def _torch_layer_norm(module: nn.LayerNorm, backend: str) -> tuple[nn.Module | None, str]:
    if len(module.normalized_shape) != 1:
        return None, (f"normalises over {len(module.normalized_shape)} dims {tuple(module.normalized_shape)}; "
                      f"fastgpt normalises over the last dim only")
    new = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                    bias=module.bias is not None, device="meta", backend=backend)
    new.weight, new.bias = module.weight, module.bias
    return new, ""


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
    mask = getattr(module, "mask", None)
    if isinstance(mask, torch.Tensor):
        context_length = mask.shape[-1]
        if mask.dim() != 2 or mask.shape[0] != context_length or (mask.device.type != "meta" and not torch.equal(
                mask.bool(), torch.ones_like(mask, dtype=torch.bool).triu(diagonal=1))):
            return None, "its `mask` buffer is not the book's causal triu(ones(T, T), diagonal=1)"
    elif getattr(module, "causal", None) is True:
        context_length = getattr(module, "context_length", 0)
    else:
        return None, "no causal `mask` buffer and no `causal = True`: not a causal self-attention"
    qkv_bias = W_query.bias is not None
    out_proj, num_heads = getattr(module, "out_proj", None), getattr(module, "num_heads", None)
    if out_proj is None and num_heads is None:
        new = CausalAttention(d_in, d_out, context_length, dropout.p, qkv_bias, backend=backend, device="meta")
    elif isinstance(out_proj, nn.Linear) and isinstance(num_heads, int) and num_heads > 0 and d_out % num_heads == 0 \
            and (out_proj.in_features, out_proj.out_features) == (d_out, d_out):
        new = MultiHeadAttention(d_in, d_out, context_length, dropout.p, num_heads, qkv_bias, backend=backend,
                                 device="meta")
        new.out_proj = out_proj
    else:
        return None, "has W_query/W_key/W_value but not the book's out_proj (d_out -> d_out) and int num_heads"
    new.W_query, new.W_key, new.W_value, new.dropout = W_query, W_key, W_value, dropout
    probe_tokens = min(8, context_length) if context_length > 0 else 8
    why = _probe_mismatch(module, new, _probe_input((2, probe_tokens, d_in), W_query.weight))
    return (None, f"not the book's causal attention: {why}") if why else (new, "")


def _replacement(module: nn.Module, backend: str) -> tuple[nn.Module | None, str | None]:
    """(fused replacement, None) | (None, reason it is left) | (None, None) when not a candidate."""
    kind = type(module)
    if kind is nn.LayerNorm:
        return _torch_layer_norm(module, backend)
    if isinstance(module, nn.LayerNorm):
        return None, "a subclass of torch.nn.LayerNorm: its forward may differ from layer norm"
    if isinstance(module, nn.MultiheadAttention):
        return None, ("torch.nn.MultiheadAttention is not supported (masks and causality come per call); "
                      "use fastgpt.nn.MultiHeadAttention or fastgpt.attention")
    if kind.__name__ == "LayerNorm":
        return _book_layer_norm(module, backend)
    if all(hasattr(module, name) for name in _QKV):
        return _book_attention(module, backend)
    if kind.__name__.lower().endswith("attention"):
        if not kind.__module__.startswith("transformers."):
            return None, "an attention module fastgpt does not recognise"
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        hf = sys.modules.get("fastgpt.hf")  # imported only by those who use it (it imports transformers)
        if hf is not None and implementation in hf.REGISTERED:
            return None, None  # already runs fastgpt.attention
        return None, ("an attention module fastgpt does not recognise (a transformers model: use "
                      "attn_implementation='fastgpt' after `import fastgpt.hf`)")
    return None, None


def _is_fastgpt_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastgpt.") and isinstance(getattr(module, "backend", None), str)


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Swap, in place, the layer norms and book-style causal attention modules of `model` for
    fastgpt's fused ones running on `backend`, and return a PatchReport.

    - torch.nn.LayerNorm over the last dim -> fastgpt.nn.LayerNorm;
    - the book's LayerNorm (class named LayerNorm with `scale`, `shift`, `eps`) -> fastgpt.nn.LayerNorm;
    - the book's MultiHeadAttention (W_query/W_key/W_value, out_proj, num_heads, dropout, causal
      `mask` buffer) -> fastgpt.nn.MultiHeadAttention; its CausalAttention -> fastgpt.nn.CausalAttention;
    - fastgpt's own modules (already fused) get `backend` set: patching twice never double-wraps.
    Replacements share the originals' Parameters (same device, dtype and identity); the patched
    model's state_dict names the book's scale/shift `weight`/`bias` and has no `mask` buffers,
    and loads the book's state_dict as is (fastgpt.nn's modules accept its names). Duck-typed
    candidates are checked on a small probe input before they are swapped; a module whose
    output would change is left, with the reason in the report. Anything else is untouched.
    Every replacement is decided before any is made, so an error leaves `model` as it was.
    """
    check_backend_name(backend)
    report = PatchReport()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, replacement)
    retargets: list[nn.Module] = []

    def visit(module: nn.Module, name: str, parent: nn.Module | None, attribute: str) -> None:
        if _is_fastgpt_module(module):
            retargets.append(module)
            report.retargeted.append((name or "<root>", _type_name(module)))
        else:
            new, reason = _replacement(module, backend)
            if new is not None:
                if parent is None:
                    report.left.append(("<root>", _type_name(module),
                                        "the model itself cannot be replaced in place; build the fastgpt.nn module"))
                else:
                    swaps.append((parent, attribute, new))
                    report.swapped.append((name, _type_name(module), _type_name(new)))
                return
            if reason is not None:
                report.left.append((name or "<root>", _type_name(module), reason))
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, module, child_name)

    visit(model, "", None, "")
    for module in retargets:
        module.backend = backend
    for parent, attribute, new in swaps:
        setattr(parent, attribute, new)
    return report


__all__ = ["patch", "PatchReport"]
