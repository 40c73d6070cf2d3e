"""Loads the compiled extension fastgpt._C and the CPU kernels of one vector ISA level, or records
why they cannot be used.

`import fastgpt` never fails because of the extension: a missing, stale or
ABI-incompatible build leaves the `cpu`/`cuda` backends unavailable and
`fastgpt.info()` says why and how to fix it.

CPU levels (setup.py compiles csrc/cpu once per level into fastgpt/_cpu_<level>.so): default
(baseline x86-64, or the platform's own vectors: NEON on aarch64), avx2 (AVX2 + FMA + F16C),
avx512 (AVX-512 F/BW/DQ/VL). The highest level both built and run by this CPU (as torch sees it:
torch.backends.cpu.get_cpu_capability()) is loaded, exactly one, since each registers the same
CPU kernels. FASTGPT_CPU_CAPABILITY=default|avx2|avx512 picks one; a level above what the CPU
runs, or one not built, leaves the cpu backend unavailable with that reason (never an
illegal-instruction fault).
"""
from __future__ import annotations

import glob
import importlib
import os

import torch

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation --no-deps -e .` (or `make build`)"

_C = None
LOAD_ERROR: str | None = None
CPU_LEVELS = ("default", "avx2", "avx512")  # lowest first
CPU_CAPABILITY: str | None = None  # the level whose CPU kernels are loaded
CPU_ERROR: str | None = None  # why no CPU kernels are loaded (None when CPU_CAPABILITY is set)


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
    _load_cpu_kernels()


def supported_cpu_levels() -> tuple[str, ...]:
    """The levels this CPU runs, lowest first (what torch's own kernel dispatch found)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return CPU_LEVELS[:CPU_LEVELS.index(capability) + 1] if capability in CPU_LEVELS else CPU_LEVELS[:1]


def built_cpu_levels() -> dict[str, str]:
    """level -> the path of its fastgpt/_cpu_<level> library, for the levels this build has."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = {level: sorted(glob.glob(os.path.join(here, f"_cpu_{level}.*so")) + sorted(
        glob.glob(os.path.join(here, f"_cpu_{level}.*pyd")))) for level in CPU_LEVELS}
    return {level: paths[0] for level, paths in found.items() if paths}


def _load_cpu_kernels() -> None:
    global CPU_CAPABILITY, CPU_ERROR
    built, supported = built_cpu_levels(), supported_cpu_levels()
    requested = os.environ.get("FASTGPT_CPU_CAPABILITY", "").strip().lower()
    if requested:
        if requested not in CPU_LEVELS:
            CPU_ERROR = f"FASTGPT_CPU_CAPABILITY={requested!r} is not a level: expected one of {', '.join(CPU_LEVELS)}"
            return
        if requested not in supported:
            CPU_ERROR = (f"FASTGPT_CPU_CAPABILITY={requested} is above what this CPU runs (at most {supported[-1]}); "
                         f"its kernels would fault with an illegal instruction")
            return
        level = requested
    else:
        usable = [lv for lv in supported if lv in built]
        level = usable[-1] if usable else supported[-1]
    if level not in built:
        CPU_ERROR = (f"the CPU kernels were not built for the {level} level (built: {', '.join(built) or 'none'}); "
                     f"{REBUILD_HINT}")
        return
    try:
        torch.ops.load_library(built[level])
    except OSError as error:
        CPU_ERROR = f"fastgpt/_cpu_{level} does not load ({str(error).splitlines()[0][:160]}); {REBUILD_HINT}"
        return
    CPU_CAPABILITY = level


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastgpt::<op> has a kernel registered for `dispatch_key` ('CPU', 'CUDA')."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", dispatch_key)


def built_with_cuda() -> bool:
    return has_kernel("attention_fwd", "CUDA")


_load()
