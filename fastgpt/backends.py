"""The backends behind fastgpt.attention / layer_norm / rms_norm / add_rms_norm, and which one runs.

Each backend declares here, and nowhere else, what it supports: devices (and why it is
unavailable on one), dtypes, attention head dims, the ops it has a kernel for (OPS; a backend
without one says so, and `auto` passes it over for that op), and the combinations it refuses. The
same declarations decide dispatch and word the errors: `select` for the public API (after
fastgpt.ops has validated the inputs, before any kernel runs), `refusal` for the Triton
operators' own safety nets. (The C++/CUDA kernels compile their supported set in; tests
check that it agrees with the declarations below.)
- an explicit backend that cannot run raises and says why;
- `auto` takes the first backend of AUTO_ORDER that can.

Availability is computed once, at import, so that selection is plain dictionary
work that torch.compile traces without graph breaks.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import _extension, reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NAMES = ("naive", "sdpa", "cpu", "cuda", "triton")
AUTO_ORDER = {"cuda": ("cuda", "triton", "sdpa", "naive"), "cpu": ("cpu", "sdpa", "naive")}
BACKEND_NAMES = ("auto",) + NAMES  # what every `backend=` argument accepts
OPS = ("attention", "layer_norm", "rms_norm", "add_rms_norm")  # the public ops; a Backend field each
# Attention calls with at most this many queries (decoding against a KV cache) take each fused
# backend's split-KV decode kernel: the keys are split into chunks attended in parallel and merged
# by log-sum-exp, and a GQA group's query heads share one pass over their kv head. The C++ and CUDA
# kernels compile the same bound in (kDecodeMaxQueries; tests check that it agrees).
DECODE_MAX_QUERIES = 16


def check_backend_name(backend: str) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    return backend


@dataclass(frozen=True)
class Refusal:
    """A combination a backend takes in principle but refuses: `op` on `device_type` tensors of `dtype`."""
    op: str
    device_type: str
    dtype: torch.dtype
    reason: str


# What an attention call may need beyond causal + key padding, and how the errors name it.
ATTENTION_FEATURES = {
    "gqa": "grouped-query attention (k, v with fewer heads than q)",
    "window": "a sliding window",
    "softcap": "a logit softcap",
}
ALL_FEATURES = frozenset(ATTENTION_FEATURES)


def attention_features(q_heads: int, kv_heads: int, window: int | None, softcap: float | None) -> frozenset[str]:
    """The features of ATTENTION_FEATURES that an attention call uses."""
    used = {"gqa": kv_heads != q_heads, "window": window is not None, "softcap": softcap is not None}
    return frozenset(name for name, needed in used.items() if needed)


@dataclass
class Backend:
    name: str
    description: str
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None  # None: any head dim
    # device type -> None when usable there, else the reason it is not
    unavailable: dict[str, str | None] = field(default_factory=dict)
    # (q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap, return_lse) -> out,
    # or (out, lse (B, Hq, Tq) float32) with return_lse; window 0 and softcap 0.0 mean none (the
    # operators' convention)
    attention: Callable | None = None
    layer_norm: Callable | None = None  # (x2d, weight, bias, eps) -> y2d
    rms_norm: Callable | None = None  # (x2d, weight or None, eps, offset) -> y2d
    add_rms_norm: Callable | None = None  # (x2d, residual2d, weight or None, eps, offset) -> (y2d, sum2d)
    # op -> why this backend has no kernel for it (its field above stays None); refusal() and auto use it
    missing: dict[str, str] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    features: frozenset[str] = ALL_FEATURES  # the ATTENTION_FEATURES its attention runs
    # feature -> how this backend runs it, where that is not fused (fastgpt.info() shows it)
    unfused: dict[str, str] = field(default_factory=dict)

    def why_not(self, device_type: str) -> str | None:
        return self.unavailable.get(device_type, f"the {self.name} backend does not run on {device_type} tensors")

    def lacks(self, op: str) -> str | None:
        """None when this backend has a kernel for `op` (one of OPS), else why not (declared in `missing`)."""
        return self.missing.get(op)


def _with_reference_lse(out, q, k, causal, key_padding_mask, scale, window, softcap, return_lse):
    """out, or (out, lse) with the log-sum-exp of reference.py's matmul scores (differentiable)."""
    if not return_lse:
        return out
    lse = reference.attention_lse(q, k, causal, key_padding_mask, scale, window or None, softcap or None)
    return out, lse.float()


def _sdpa_attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap, return_lse=False):
    return _with_reference_lse(_sdpa_out(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap),
                               q, k, causal, key_padding_mask, scale, window, softcap, return_lse)


def _sdpa_out(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap):
    # SDPA draws its own dropout mask (torch's RNG), so `seed` is unused here.
    if softcap:  # SDPA has no softcap: the matmul attention of reference.py
        return reference.attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window or None, softcap)
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if key_padding_mask is None and not window and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    keep = reference.visible_keys(Tq, Tk, causal, key_padding_mask, q.device, window or None)
    has_key = keep.any(dim=-1, keepdim=True)  # (B|1, 1, Tq, 1)
    # SDPA returns NaN for a row with no visible key; let such rows see key 0, then zero them.
    first_key = torch.arange(Tk, device=q.device) == 0
    keep = keep | (~has_key & first_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


def _naive_attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap, return_lse=False):
    out = reference.attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window or None,
                              softcap or None)
    return _with_reference_lse(out, q, k, causal, key_padding_mask, scale, window, softcap, return_lse)


def _extension_attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window, softcap,
                         return_lse=False):
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, key_padding_mask, causal, scale, dropout_p, seed,
                                               window, softcap)
    return (out, lse) if return_lse else out


def _extension_layer_norm(x, weight, bias, eps):
    return torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, eps)[0]


def _extension_rms_norm(x, weight, eps, offset):
    return torch.ops.fastgpt.rms_norm_fwd(x, weight, eps, offset)[0]


def _extension_add_rms_norm(x, residual, weight, eps, offset):
    y, total, _ = torch.ops.fastgpt.add_rms_norm_fwd(x, residual, weight, eps, offset)
    return y, total


def _sdpa_rms_norm(x, weight, eps, offset):
    # The torch baseline: offset + weight in the dtype of x, as a model written for F.rms_norm does.
    return F.rms_norm(x, x.shape[-1:], weight if weight is None or offset == 0.0 else offset + weight, eps)


def _sdpa_add_rms_norm(x, residual, weight, eps, offset):
    total = x + residual
    return _sdpa_rms_norm(total, weight, eps, offset), total


def _extension_reasons() -> dict[str, str | None]:
    """Why the C++ (`cpu`) and CUDA (`cuda`) backends can or cannot run here."""
    if _extension._C is None:
        reason = _extension.LOAD_ERROR
        return {"cpu": reason, "cuda": reason}
    reasons: dict[str, str | None] = {"cpu": None, "cuda": None}
    if _extension.CPU_ERROR is not None:
        reasons["cpu"] = _extension.CPU_ERROR
    elif not _extension.has_kernel("attention_fwd", "CPU"):
        reasons["cpu"] = "no CPU kernels are registered (fastgpt/_cpu_<level> was not built)"
    if not _extension.built_with_cuda():
        reasons["cuda"] = ("fastgpt._C was built without CUDA (no CUDA toolkit or a CPU build of torch "
                           "at build time; FASTGPT_CUDA=1 forces it)")
    elif not torch.cuda.is_available():
        reasons["cuda"] = "no CUDA device is visible (torch.cuda.is_available() is False)"
    elif torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        reasons["cuda"] = f"the CUDA kernels need compute capability >= 8.0 (sm_80), this GPU is sm_{major}{minor}"
    return reasons


def _triton_reasons() -> dict[str, str | None]:
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed (pip install triton)"
        return {"cpu": reason, "cuda": reason}
    reasons: dict[str, str | None] = {"cpu": None, "cuda": None}
    if os.environ.get("TRITON_INTERPRET") != "1":
        reasons["cpu"] = "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before import"
    if not torch.cuda.is_available():
        reasons["cuda"] = "no CUDA device is visible (torch.cuda.is_available() is False)"
    return reasons


def _build_registry() -> dict[str, Backend]:
    ext = _extension_reasons()
    registry = {
        "naive": Backend("naive", "the book's matmul attention (fastgpt/reference.py)",
                         FLOAT_DTYPES + (torch.float64,), None, {"cpu": None, "cuda": None},
                         _naive_attention, reference.layer_norm, reference.rms_norm, reference.add_rms_norm),
        "sdpa": Backend("sdpa", "torch.nn.functional.scaled_dot_product_attention / F.layer_norm / F.rms_norm",
                        FLOAT_DTYPES + (torch.float64,), None, {"cpu": None, "cuda": None},
                        _sdpa_attention, lambda x, w, b, eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
                        _sdpa_rms_norm, _sdpa_add_rms_norm,
                        unfused={"window": "an explicit (Tq, Tk) boolean mask",
                                 "softcap": "the matmul attention of reference.py (SDPA has no softcap)",
                                 "return_lse": "the log-sum-exp of reference.py's matmul scores (SDPA "
                                               "returns none)"}),
        "cpu": Backend("cpu", f"fused C++ kernels (csrc/cpu), {_extension.CPU_CAPABILITY or 'no'} level "
                       "(FASTGPT_CPU_CAPABILITY)", FLOAT_DTYPES + (torch.float64,),
                       tuple(range(1, 257)), {"cpu": ext["cpu"]},
                       _extension_attention, _extension_layer_norm, _extension_rms_norm, _extension_add_rms_norm,
                       features=frozenset({"gqa", "window", "softcap"})),
        "cuda": Backend("cuda", "fused CUDA kernels (csrc/cuda)", FLOAT_DTYPES, (16, 32, 64, 80, 96, 128, 256),
                        {"cuda": ext["cuda"]}, _extension_attention, _extension_layer_norm, _extension_rms_norm,
                        _extension_add_rms_norm, features=frozenset({"gqa", "window", "softcap"})),
        "triton": Backend("triton", "fused Triton kernels (fastgpt/triton)", FLOAT_DTYPES,
                          (16, 32, 64, 80, 96, 128, 256), _triton_reasons(),
                          refusals=(Refusal("attention", "cpu", torch.bfloat16,
                                            "Triton's CPU interpreter has no bfloat16 tl.dot (it returns wrong "
                                            "numbers): use float16 or float32 on CPU tensors, bfloat16 on a GPU"),),
                          features=frozenset({"gqa", "window", "softcap"})),
    }
    triton = registry["triton"]
    if any(reason is None for reason in triton.unavailable.values()):
        try:
            from .triton import attention as triton_attention, layer_norm as triton_layer_norm, rms_norm as triton_rms
            triton.attention, triton.layer_norm = triton_attention.attention, triton_layer_norm.layer_norm
            triton.rms_norm, triton.add_rms_norm = triton_rms.rms_norm, triton_rms.add_rms_norm
        except Exception as error:  # noqa: BLE001 - any import failure makes the backend unavailable
            reason = f"fastgpt.triton failed to import: {type(error).__name__}: {error}"
            triton.unavailable = {device: reason for device in triton.unavailable}
    return registry


REGISTRY = _build_registry()
# Every dtype some backend takes: what fastgpt.ops accepts before selecting one.
ALL_DTYPES = tuple(dtype for dtype in FLOAT_DTYPES + (torch.float64,)
                   if any(dtype in backend.dtypes for backend in REGISTRY.values()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _one_of(items) -> str:
    """'a', 'a or b', 'a, b or c'."""
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def dtypes_expected() -> str:
    """The dtypes the public API accepts, and which backends take the ones not every backend
    takes: 'float16, bfloat16, float32 or float64 (float64: naive, sdpa, cpu)'."""
    partial = []
    for dtype in ALL_DTYPES:
        takers = [name for name, backend in REGISTRY.items() if dtype in backend.dtypes]
        if len(takers) < len(REGISTRY):
            partial.append(f"{_dtype_name(dtype)}: {', '.join(takers)}")
    names = _one_of(_dtype_name(d) for d in ALL_DTYPES)
    return names + (f" ({'; '.join(partial)})" if partial else "")


def select(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
           features: frozenset[str] = frozenset(), op: str | None = None) -> Backend:
    """The backend that runs a call of `op` (one of OPS) on `device` with `dtype`: attention passes
    its `head_dim` and the ATTENTION_FEATURES it uses, the norms pass None (op defaults to
    "attention" with a head dim, else "layer_norm")."""
    op = op or ("layer_norm" if head_dim is None else "attention")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("naive",)):
            candidate = REGISTRY[name]
            if refusal(candidate, op, device, dtype, head_dim, features) is None:
                return candidate
        raise RuntimeError(f"fastgpt.{op}: no backend can run {dtype} tensors on {device}; see fastgpt.info()")
    if backend not in REGISTRY:
        raise ValueError(f"fastgpt.{op}: unknown backend {backend!r}; expected one of {('auto',) + NAMES}")
    chosen = REGISTRY[backend]
    why = refusal(chosen, op, device, dtype, head_dim, features)
    if why is not None:
        error = (RuntimeError if why.startswith("unavailable") else
                 NotImplementedError if why == chosen.lacks(op) else ValueError)
        raise error(f"fastgpt.{op}: backend={backend!r} cannot run this call: {why}")
    return chosen


def refusal(backend: Backend | str, op: str, device: torch.device, dtype: torch.dtype,
            head_dim: int | None = None, features: frozenset[str] = frozenset()) -> str | None:
    """None when `backend` runs `op` (one of OPS: "attention" with its head dim and features) on
    `device` with `dtype`; else why not, from the backend's declarations above."""
    candidate = REGISTRY[backend] if isinstance(backend, str) else backend
    why = candidate.why_not(device.type)
    if why is not None:
        return f"unavailable on {device.type}: {why}"
    why = candidate.lacks(op)
    if why is not None:
        return why
    if dtype not in candidate.dtypes:
        return f"dtype must be {_one_of(_dtype_name(d) for d in candidate.dtypes)}, got {_dtype_name(dtype)}"
    for refused in candidate.refusals:
        if (refused.op, refused.device_type, refused.dtype) == (op, device.type, dtype):
            return refused.reason
    if head_dim is not None and candidate.head_dims is not None and head_dim not in candidate.head_dims:
        dims = candidate.head_dims
        supported = f"{dims[0]}..{dims[-1]}" if len(dims) > 8 else _one_of(dims)
        return f"head dim must be {supported}, got {head_dim}"
    missing = sorted(features - candidate.features)
    if missing:
        return f"{_one_of(ATTENTION_FEATURES[name] for name in missing)} is not implemented in this backend"
    return None


def info() -> dict[str, dict]:
    """backend -> {available, devices, reason, description}; plus 'auto' -> what it picks per device."""
    report: dict[str, dict] = {}
    for name, backend in REGISTRY.items():
        devices = [device for device, why in backend.unavailable.items() if why is None]
        reasons = {device: why for device, why in backend.unavailable.items() if why is not None}
        report[name] = {
            "available": bool(devices),
            "devices": devices,
            "reason": "; ".join(f"{device}: {why}" for device, why in reasons.items()) or None,
            "description": backend.description,
            "attention_features": sorted(backend.features),
            "ops": [op for op in OPS if op not in backend.missing],
            "missing_ops": dict(backend.missing),
            "not_fused": dict(backend.unfused),
        }
    report["cpu"]["cpu_capability"] = _extension.CPU_CAPABILITY  # the vector ISA level of its kernels
    report["cpu"]["cpu_levels"] = {"built": list(_extension.built_cpu_levels()),
                                   "supported": list(_extension.supported_cpu_levels())}
    picks = {}
    for device_type, order in AUTO_ORDER.items():
        usable = [name for name in order if REGISTRY[name].why_not(device_type) is None]
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        picks[device_type] = usable[0] if usable else None
    report["auto"] = {"available": True, "devices": list(picks), "picks": picks,
                      "reason": None, "description": "the best available backend for the tensors' device"}
    return report
