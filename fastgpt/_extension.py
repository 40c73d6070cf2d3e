"""Loads the compiled extension fastgpt._C, or records why it cannot be used.

`import fastgpt` never fails because of the extension: a missing, stale or
ABI-incompatible build leaves the `cpu`/`cuda` backends unavailable and
`fastgpt.info()` says why and how to fix it.
"""
from __future__ import annotations

import importlib

import torch

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation --no-deps -e .` (or `make build`)"

_C = None
LOAD_ERROR: str | None = None


def _torch_release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the ABI is fixed by the release, the local tag names the CUDA build."""
    return version.split("+", 1)[0]


def _load() -> None:
    global _C, LOAD_ERROR
    try:
        module = importlib.import_module("fastgpt._C")
    except ImportError as error:
        message = str(error)
        if "undefined symbol" in message:
            LOAD_ERROR = (f"fastgpt._C does not match the installed torch {torch.__version__} "
                          f"({message.splitlines()[0][:160]}); {REBUILD_HINT}")
        else:
            LOAD_ERROR = f"fastgpt._C is not built ({message[:160]}); {REBUILD_HINT}"
        return
    built_for = getattr(module, "torch_version", "unknown")
    if _torch_release(built_for) != _torch_release(torch.__version__):
        LOAD_ERROR = (f"fastgpt._C was built against torch {built_for} but torch {torch.__version__} "
                      f"is installed; an extension built for one torch ABI cannot run under another: "
                      f"install the matching torch or {REBUILD_HINT}")
        return
    _C = module


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastgpt::<op> has a kernel registered for `dispatch_key` ('CPU', 'CUDA')."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", dispatch_key)


def built_with_cuda() -> bool:
    return has_kernel("attention_fwd", "CUDA")


_load()
