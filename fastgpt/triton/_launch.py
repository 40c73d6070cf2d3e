"""How the Triton kernels of fastgpt are launched: autotuning and the CUDA device.

On a GPU each kernel is wrapped in `triton.autotune` over a small list of block
sizes / warps / pipeline stages (listed in the kernel's module header). Triton
benchmarks the candidates on the first call for a new key and caches the winner
in-process for that key; the key is chosen so that it changes rarely:
sequence lengths go by power-of-two bucket (`length_bucket`), never by exact value,
so decoding with a growing KV cache does not retune at every step. Triton adds the
dtype of every tensor argument to the key by itself.

Under TRITON_INTERPRET=1 (CPU tensors, for tests) each kernel gets one fixed
config instead: the interpreter would otherwise time every candidate in Python.
The interpreter configs use small tiles on purpose, so that short test sequences
already span several tiles and exercise the tile-boundary code.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import triton

from .. import backends

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SHORTEST_BUCKET, LONGEST_BUCKET = 16, 16384


def length_bucket(T: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, clamped to [16, 16384]."""
    return min(max(triton.next_power_of_2(T), SHORTEST_BUCKET), LONGEST_BUCKET)


def autotune(gpu_configs: list[triton.Config], interpreter_config: triton.Config, key: list[str],
             prune: Callable | None = None):
    """triton.autotune over `gpu_configs` (pruned per call by `prune`), or over the single
    `interpreter_config` under TRITON_INTERPRET=1."""
    if INTERPRET:
        return triton.autotune(configs=[interpreter_config], key=key)
    return triton.autotune(configs=gpu_configs, key=key,
                           prune_configs_by={"early_config_prune": prune} if prune is not None else None)


def config(num_warps: int, num_stages: int, **block_sizes: int) -> triton.Config:
    return triton.Config(block_sizes, num_warps=num_warps, num_stages=num_stages)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_capabilities(op: str, kind: str, t: torch.Tensor, head_dim: int | None = None,
                       features: frozenset[str] = frozenset()) -> None:
    """The safety net of the operator fastgpt::<op> (fastgpt.ops validates the public API first):
    the `triton` backend must run `kind` ("attention" / "layer_norm") on t's device and dtype,
    as fastgpt/backends.py declares."""
    why = backends.refusal("triton", kind, t.device, t.dtype, head_dim, features)
    torch._check(why is None, lambda: f"fastgpt::{op}: {why}")
