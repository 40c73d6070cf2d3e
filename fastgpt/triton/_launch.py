"""How the Triton kernels of fastgpt are launched: autotuning and the CUDA device.

On a GPU each kernel is wrapped in `triton.autotune` over a small list of block
sizes / warps / pipeline stages (listed in the kernel's module header). Triton
benchmarks the candidates on the first call for a new key and caches the winner
in-process for that key; the key is chosen so that it changes rarely:
sequence lengths go by power-of-two bucket (`length_bucket`), never by exact value,
so decoding with a growing KV cache does not retune at every step. Triton adds the
dtype of every tensor argument to the key by itself.

Before benchmarking, the candidates whose compiled code spills registers are pruned
(`spill_free_pruner`, after each kernel's own pruning to the call's lengths and head dim):
benchmarks/results/gpu_resources.md lists which candidates spill where.

Under TRITON_INTERPRET=1 (CPU tensors, for tests) each kernel gets one fixed
config instead: the interpreter would otherwise time every candidate in Python.
The interpreter configs use small tiles on purpose, so that short test sequences
already span several tiles and exercise the tile-boundary code.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from .. import backends

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SHORTEST_BUCKET, LONGEST_BUCKET = 16, 16384


def length_bucket(T: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, clamped to [16, 16384]."""
    return min(max(triton.next_power_of_2(T), SHORTEST_BUCKET), LONGEST_BUCKET)


def autotune(gpu_configs: list[triton.Config], interpreter_config: triton.Config, key: list[str],
             prune: Callable | None = None):
    """triton.autotune over `gpu_configs` (pruned per call by `prune`, then by spill_free_pruner), or
    over the single `interpreter_config` under TRITON_INTERPRET=1."""
    if INTERPRET:
        return triton.autotune(configs=[interpreter_config], key=key)

    def decorator(fn):
        return triton.autotune(configs=gpu_configs, key=key,
                               prune_configs_by={"early_config_prune": spill_free_pruner(fn, prune)})(fn)
    return decorator


def spill_free_pruner(fn, prune: Callable | None = None) -> Callable:
    """An early_config_prune for the @triton.jit `fn`: `prune`'s candidates (all without it), then
    only those whose compiled code spills the fewest registers to local memory -- none, unless every
    candidate spills. A spilling candidate is slow for a reason the benchmark need not find out, and
    may even win a short benchmark yet lose at scale. The candidates are compiled here, for this call's
    arguments (`warmup`); Triton caches the binaries, which the benchmark then launches."""
    def early_config_prune(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune is not None else list(configs)
        if len(kept) <= 1:
            return kept
        spills = [compiled_spills(fn, config, named_args, kwargs) for config in kept]
        return [config for config, spilled in zip(kept, spills) if spilled == min(spills)]
    return early_config_prune


def compiled_spills(fn, config: triton.Config, named_args: dict, kwargs: dict) -> float:
    """Registers spilled by `fn` compiled with `config` for a call with these arguments; infinite
    where the kernel cannot launch on this GPU at all (more shared memory than a block may have:
    float32 tiles of the widest head dim, benchmarks/results/gpu_resources.md)."""
    compiled = fn.warmup(**named_args, **kwargs, **config.all_kwargs(), grid=(1,))
    try:
        compiled._init_handles()  # loads the binary: n_spills is known from then on
    except OutOfResources:
        return math.inf
    return compiled.n_spills


def config(num_warps: int, num_stages: int, **block_sizes: int) -> triton.Config:
    return triton.Config(block_sizes, num_warps=num_warps, num_stages=num_stages)


INT32_MAX = 2**31 - 1


def int32_tile_offsets(t: torch.Tensor | None, tile_extents: dict[int, int]) -> torch.Tensor | None:
    """t, or a contiguous copy of t when an offset inside one tile could pass int32. The kernels
    widen every base they derive from a program index (a tile's first row, a batch, a head) to
    int64 before it multiplies a stride, but keep the offsets within a tile, Σ (extent - 1) · stride
    over the tile's dims (`tile_extents`: dim -> elements a tile spans along it), in int32: int64
    offsets for every element would double the registers they take. Only a view with a stride
    above 2^31 / 128 elements on a tiled dim needs the copy (whose strides are then small)."""
    if t is None:
        return None
    span = sum((min(extent, t.shape[dim]) - 1) * t.stride(dim) for dim, extent in tile_extents.items()
               if t.shape[dim] > 0)
    return t.contiguous() if span > INT32_MAX else t


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
