"""Context parallelism: one sequence split over the ranks of a process group, attended by a ring.

Layout (shard / unshard). Causal attention costs a query in proportion to its position, so
contiguous slices would leave the first rank idle while the last one works. The T tokens are
cut into 2N chunks of c = T / (2N) for N ranks, and rank r holds chunk r followed by chunk
2N-1-r (the load-balanced "zigzag" layout): every rank holds one early and one late chunk, and
its tokens stay in their global order.

Ring attention (ring_attention). Each rank keeps its queries; the key/value shards, with their
key_padding_mask shard, travel round the ring r -> r+1 in N steps, the next transfer posted
before the current block is computed so that the two overlap. In the zigzag layout every step
is one kernel call of the same causal work, and a sub-block that no query sees is never computed:
  own keys (step 0):   all 2c queries over all 2c keys, causal (local order is global order);
  keys of rank s < r:  all 2c queries over s's first chunk, in full (s's second chunk comes
                       after every query of r: skipped);
  keys of rank s > r:  r's second chunk of queries over all 2c keys, in full (r's first chunk
                       comes before every key of s: skipped).
Without causal every step is all queries over all keys.

The log-sum-exp merge. A kernel call returns its block's output o_b, normalised over the
block's visible keys, and lse_b = log Σ_j exp(s_ij) over them (-inf where it saw none). The
running (out, lse) takes a block in as lse' = logaddexp(lse, lse_b), out' = out·exp(lse - lse')
+ o_b·exp(lse_b - lse'), in float32 (float64 for float64 inputs). Invariant: after any set of
blocks, (out, lse) is the attention over exactly their keys. A row that no block has shown a key
keeps lse = -inf; its offsets are taken against 0 instead of lse' = -inf, so it stays zeros
rather than NaN (-inf - -inf).

Backward. Given the forward's global out and lse, a block's kernel backward is exact on its
own: P_ij = exp(s_ij - lse_i) are the global probabilities and delta_i = rowsum(dO ∘ O)_i the
global one, so dS = P ∘ (dP - delta) needs nothing from the other blocks and the gradients
simply add up over blocks. It is a second ring pass: K/V travel again (overlapped with the
compute, as in the forward), and dK/dV accumulators follow each block they were added to: they
collect every rank's contribution and arrive home after the last step; dQ stays on its rank. A
rank waits for the accumulators before adding its block's part (overlapping that transfer too
would hold a second copy of them).

What ring attention refuses: dropout (a block's Philox mask is keyed by its element offset in
the (Tq, Tk) matrix of one call, which the ring's calls do not reproduce), sliding windows (a
window cuts another rank's key chunk at an offset, query position minus chunk start, that the
kernels' bottom-right aligned window cannot express), and the naive / sdpa backends (it needs a
fused kernel's (out, lse) forward and its backward operator: cpu, cuda or triton).

Bad input never hangs: before any exchange, every rank's call (its shapes, dtype, options, and
whether it is valid at all) is compared in one small all_gather, and any disagreement raises the
same error on every rank.

context_parallel(model) runs fastgpt's own models (GPT-2, Llama 3, Qwen 3; not Gemma 3's sliding
layers) on shards: see ContextParallel.
"""
from __future__ import annotations

import math
import socket
import struct
import time
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from . import backends, ops
from .nn import _CausalSelfAttention

# The backends ring attention runs on: a forward that returns (out, lse) and a backward operator
# that takes them back. backend -> (forward, backward) operator of torch.ops.fastgpt.
BLOCK_KERNELS = {"cpu": ("attention_fwd", "attention_bwd"), "cuda": ("attention_fwd", "attention_bwd"),
                 "triton": ("triton_attention_fwd", "triton_attention_bwd")}
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SIGNATURE_SIZE = 24  # int64 entries of the call signature every rank compares
_ERRORS = {error.__name__: error for error in (ValueError, TypeError, RuntimeError, NotImplementedError)}


def _group_of(op: str, group) -> tuple[dist.ProcessGroup, int, int]:
    """(group, its size N, this rank's index in it); group None is the default (world) group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"fastgpt.{op}: torch.distributed must be initialised "
                           f"(torch.distributed.init_process_group, or run under torchrun), got no process group")
    group = dist.group.WORLD if group is None else group
    return group, dist.get_world_size(group), dist.get_rank(group)


def _check_chunks(op: str, length: int, world: int, dim: int) -> None:
    if length % (2 * world) != 0:
        raise ValueError(f"fastgpt.{op}: the sequence length (dim {dim}) must be divisible by 2 x the world size "
                         f"= {2 * world} (the zigzag layout's chunks), got {length}")


def shard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's part of x along `dim` (the sequence) in the zigzag layout: with N ranks, the
    sequence cut into 2N equal chunks, rank r takes chunk r and chunk 2N-1-r, concatenated.
    x (..., T, ...) -> (..., T / N, ...); T must be divisible by 2N."""
    _, world, rank = _group_of("shard", group)
    _check_chunks("shard", x.shape[dim], world, dim)
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def unshard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """The whole sequence, on every rank, from each rank's shard (the inverse of shard):
    x (..., T / N, ...) -> (..., T, ...). A gather of results, not differentiable."""
    group, world, _ = _group_of("unshard", group)
    dim = dim % x.dim()
    problem = None
    if x.shape[dim] % 2 != 0:
        problem = ValueError(f"fastgpt.unshard: the shard length (dim {dim}) must be even (two zigzag chunks of "
                             f"T / (2N), as shard makes), got {x.shape[dim]}")
    dtype = _DTYPE_CODES.index(x.dtype) if x.dtype in _DTYPE_CODES else -1
    _check_ranks_agree("unshard", group, [dim, dtype, *x.shape], problem,
                       f"shard {tuple(x.shape)} {x.dtype}, dim {dim}")
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group)
    halves = [part.chunk(2, dim) for part in parts]  # rank i holds chunks i and 2N-1-i
    return torch.cat([halves[i][0] for i in range(world)] + [halves[i][1] for i in reversed(range(world))], dim)


def _check_ranks_agree(op: str, group, signature: list[int], problem: Exception | None, description: str) -> None:
    """Returns when every rank of `group` makes a valid call (problem None) with the same
    signature; else raises the same error on every rank. Every rank takes part in the same
    collectives whatever its input, so that a bad call fails instead of hanging the others."""
    world = dist.get_world_size(group)
    on_gpu = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if problem is None and len(signature) > _SIGNATURE_SIZE:
        problem = ValueError(f"fastgpt.{op}: tensors of at most {_SIGNATURE_SIZE - 2} dims are supported, "
                             f"got {len(signature) - 2}")
    mine = torch.full((1 + _SIGNATURE_SIZE,), -1, dtype=torch.int64)
    mine[0] = problem is not None
    if problem is None:
        mine[1:1 + len(signature)] = torch.tensor(signature, dtype=torch.int64)
    everyone = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(everyone, mine.to(device), group)
    if all(torch.equal(theirs, everyone[0]) for theirs in everyone) and not bool(everyone[0][0]):
        return
    # Something is wrong somewhere: one more (rare) collective tells every rank what.
    reports = [None] * world
    dist.all_gather_object(reports, (type(problem).__name__, str(problem)) if problem else (None, description), group)
    failed = [(rank, kind, message) for rank, (kind, message) in enumerate(reports) if kind is not None]
    if not failed:
        calls = "; ".join(f"rank {rank}: {description}" for rank, (_, description) in enumerate(reports))
        raise ValueError(f"fastgpt.{op}: every rank of the group must make the same call (shapes, dtype, "
                         f"options), got {calls}")
    messages = {message for _, _, message in failed}
    kinds = {kind for _, kind, _ in failed}
    if len(failed) == world and len(messages) == 1:
        text = messages.pop()
    else:
        prefix = f"fastgpt.{op}: "
        text = prefix + "; ".join(f"on rank {rank}, {message.removeprefix(prefix)}" for rank, _, message in failed)
    raise _ERRORS.get(kinds.pop() if len(kinds) == 1 else "", ValueError)(text)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _block_kernels(q: torch.Tensor, k: torch.Tensor, softcap: float | None, backend: str):
    """(forward, backward) operators of the fused backend that runs this call; the library's
    backend errors (fastgpt.backends.select) for one that cannot."""
    features = backends.attention_features(q.shape[1], k.shape[1], None, softcap)
    chosen = backends.select(backend, q.device, q.dtype, q.shape[-1], features)
    if chosen.name not in BLOCK_KERNELS:
        how = "backend='auto' picked" if backend == "auto" else "got backend="
        raise ValueError(f"fastgpt.ring_attention: backend must be a fused one ({', '.join(BLOCK_KERNELS)}: ring "
                         f"attention merges its (out, lse) and calls its backward with them), {how} "
                         f"{chosen.name!r}")
    forward, backward = BLOCK_KERNELS[chosen.name]
    return getattr(torch.ops.fastgpt, forward), getattr(torch.ops.fastgpt, backward)


def _check_ring_call(q, k, v, key_padding_mask, window, softcap, dropout_p, scale, backend):
    """(scale, (forward, backward) operators) of a valid ring_attention call on this rank; else raises."""
    try:
        scale = ops._check_attention(q, k, v, key_padding_mask, dropout_p, scale, window, softcap)
        kernels = _block_kernels(q, k, softcap, backend)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
        raise type(error)(str(error).replace("fastgpt.attention:", "fastgpt.ring_attention:", 1)) from None
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"fastgpt.ring_attention: q and k, v must hold the same shard of the sequence (T / N "
                         f"tokens each), got {q.shape[2]} query and {k.shape[2]} key tokens")
    if q.shape[2] % 2 != 0:
        raise ValueError(f"fastgpt.ring_attention: the shard length T / N must be even (two zigzag chunks of "
                         f"T / (2N), see fastgpt.distributed.shard; T must be divisible by 2N), got {q.shape[2]}")
    if dropout_p != 0.0:
        raise ValueError(f"fastgpt.ring_attention: dropout_p must be 0 (a block's dropout mask is keyed by its "
                         f"offset in one kernel call's (Tq, Tk) matrix, which the ring's calls do not reproduce), "
                         f"got {dropout_p}")
    if window is not None:
        raise NotImplementedError(f"fastgpt.ring_attention: window must be None: a sliding window cuts another "
                                  f"rank's key chunk at an offset (query position - chunk start) that the kernels' "
                                  f"bottom-right aligned window cannot express; got window={window}")
    return scale, kernels


def _signature(q, k, v, causal, key_padding_mask, softcap, scale, backend) -> list[int]:
    """What every rank's valid call must agree on, as int64s (floats by their bits): a rank that
    runs the backward pass while another does not would wait for it forever."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return [_DTYPE_CODES.index(q.dtype), *q.shape, k.shape[1], int(bool(causal)), int(key_padding_mask is not None),
            _float_bits(scale), _float_bits(softcap or 0.0), backends.BACKEND_NAMES.index(backend), int(needs_grad)]


class _Ring:
    """This rank's place in the ring of a process group: it passes tensors on to the next rank
    and receives the previous rank's, asynchronously (torch.distributed P2P)."""

    def __init__(self, group, world: int, rank: int):
        self.group, self.size, self.rank = group, world, rank
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.previous = dist.get_global_rank(group, (rank - 1) % world)

    def pass_on(self, tensors: list[torch.Tensor], tag: int) -> tuple[list[torch.Tensor], list]:
        """Posts the sends of `tensors` to the next rank and the receives of the previous rank's
        (same shapes); returns (the receive buffers, the requests to wait on). Alone in the
        ring, a rank receives its own tensors."""
        if self.size == 1:
            return list(tensors), []
        received = [torch.empty_like(t) for t in tensors]
        transfers = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        transfers += [dist.P2POp(dist.irecv, t, self.previous, self.group, tag + i) for i, t in enumerate(received)]
        return received, dist.batch_isend_irecv(transfers)

    def source(self, step: int) -> int:
        """The rank whose keys and values this rank holds at `step`."""
        return (self.rank - step) % self.size


def step_block(rank: int, source: int, causal: bool, chunk: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the one kernel call in which `rank`'s queries meet the
    keys of `source`, as slices of their shards of 2 x `chunk` tokens (see the module docstring)."""
    everything, first_chunk, second_chunk = slice(None), slice(0, chunk), slice(chunk, None)
    if not causal:
        return everything, everything, False
    if source == rank:
        return everything, everything, True
    if source < rank:
        return everything, first_chunk, False
    return second_chunk, everything, False


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """(out, lse) <- the attention over their keys and the block's (module docstring), in place.
    out (B, H, T, D), lse (B, H, T) in the accumulation dtype; block_out, block_lse the kernel's."""
    block_lse = block_lse.to(lse.dtype)
    merged = torch.logaddexp(lse, block_lse)
    finite = torch.where(merged == -math.inf, 0.0, merged)  # no key yet: offsets against 0, not -inf
    weighted = block_out.to(out.dtype)  # the kernel's own output (or its copy): scaled in place
    out.mul_(torch.exp(lse - finite)[..., None]).add_(weighted.mul_(torch.exp(block_lse - finite)[..., None]))
    lse.copy_(merged)


def _block_keys(travelling: list[torch.Tensor], keys: slice):
    """k, v (B, Hkv, keys, D) and key_padding_mask (B, keys) or None of the shards held, contiguous."""
    block_k, block_v = (t[:, :, keys].contiguous() for t in travelling[:2])
    return block_k, block_v, travelling[2][:, keys].contiguous() if len(travelling) > 2 else None


# Both passes compute one block per step in a function of its own, so that the block's
# temporaries are freed before the next step allocates its own. Step 0 (own keys) covers every
# query and key of the shard: its outputs become the accumulators (no zeros); later steps add.

def _attend_block(forward_op, q, travelling, rows, keys, causal, scale, softcap, out, lse):
    """(out, lse) with the block of q[rows] over the held keys[keys] merged in; (None, None):
    the block's own, in the accumulation dtype."""
    block_out, block_lse = forward_op(q[:, :, rows].contiguous(), *_block_keys(travelling, keys), causal, scale,
                                      0.0, 0, 0, softcap)
    if out is None:
        accumulate = _accumulation_dtype(q.dtype)
        return block_out.to(accumulate), block_lse.to(accumulate)
    _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
    return out, lse


def _differentiate_block(backward_op, grad_out, q, out, lse, travelling, rows, keys, causal, scale, softcap,
                         grads):
    """grads = [dq, dk, dv] (this rank's dq, the held keys' dk, dv) with the block's parts added;
    None: the block's own, in the accumulation dtype."""
    block_k, block_v, block_mask = _block_keys(travelling, keys)
    parts = backward_op(grad_out[:, :, rows].contiguous(), q[:, :, rows].contiguous(), block_k, block_v,
                        out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), block_mask, causal, scale, 0.0,
                        0, 0, softcap)
    if grads is None:
        return [part.to(_accumulation_dtype(q.dtype)) for part in parts]
    for grad, part, where in zip(grads, parts, (rows, keys, keys)):
        grad[:, :, where] += part
    return grads


def _ring_forward(q, k, v, key_padding_mask, causal, scale, softcap, ring, forward_op):
    """q (B, Hq, 2c, D), k, v (B, Hkv, 2c, D), key_padding_mask (B, 2c) or None: this rank's
    shards -> out (B, Hq, 2c, D) dtype of q, lse (B, Hq, 2c) float32."""
    chunk = q.shape[2] // 2
    travelling = [k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    out = lse = None
    for step in range(ring.size):
        if step + 1 < ring.size:
            arriving, transfer = ring.pass_on(travelling, tag=0)
        rows, keys, block_causal = step_block(ring.rank, ring.source(step), causal, chunk)
        out, lse = _attend_block(forward_op, q, travelling, rows, keys, block_causal, scale, softcap, out, lse)
        if step + 1 < ring.size:
            _wait(transfer)
            travelling = arriving
    return out.to(q.dtype), lse.to(torch.float32)


def _ring_backward(grad_out, q, k, v, key_padding_mask, out, lse, causal, scale, softcap, ring, backward_op):
    """The gradients (dq, dk, dv) of this rank's shards: the second ring pass (module docstring).
    dk, dv of the keys held travel with them, collecting every rank's part on their way home:
    each step adds its part into the buffers that arrived and sends those on."""
    chunk = q.shape[2] // 2
    grad_out = grad_out.contiguous()
    travelling = [k, v] + ([key_padding_mask] if key_padding_mask is not None else [])
    grads = None  # [dq, dk, dv]
    for step in range(ring.size):
        if step + 1 < ring.size:
            arriving, transfer = ring.pass_on(travelling, tag=0)
        rows, keys, block_causal = step_block(ring.rank, ring.source(step), causal, chunk)
        if grads is not None:
            _wait(grad_transfer)  # the other ranks' parts for these keys so far
            grads[1:] = arriving_grads
        grads = _differentiate_block(backward_op, grad_out, q, out, lse, travelling, rows, keys, block_causal,
                                     scale, softcap, grads)
        arriving_grads, grad_transfer = ring.pass_on(grads[1:], tag=len(travelling))
        if step + 1 < ring.size:
            _wait(transfer)
            travelling = arriving
    _wait(grad_transfer)  # after the last step, this rank's own dk, dv arrive home
    grad_k, grad_v = arriving_grads
    return grads[0].to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, softcap, ring, kernels):
        out, lse = _ring_forward(q, k, v, key_padding_mask, causal, scale, softcap, ring, kernels[0])
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.options = causal, scale, softcap, ring, kernels[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        causal, scale, softcap, ring, backward_op = ctx.options
        grads = _ring_backward(grad_out, q, k, v, key_padding_mask, out, lse, causal, scale, softcap, ring,
                               backward_op)
        return *grads, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                   key_padding_mask: torch.Tensor | None = None, window: int | None = None,
                   softcap: float | None = None, dropout_p: float = 0.0, scale: float | None = None,
                   group=None, backend: str = "auto") -> torch.Tensor:
    """fastgpt.attention over a sequence sharded across the ranks of `group` (zigzag layout, see
    shard): every rank passes its shards and gets its shard of the output.

    q (B, Hq, T/N, D); k, v (B, Hkv, T/N, D), Hq % Hkv == 0 (grouped-query attention);
    key_padding_mask bool (B, T/N), True = keep, sharded like them -> (B, Hq, T/N, D) in q's dtype,
    equal to shard(fastgpt.attention(q_full, k_full, v_full, ...), 2). causal: over global positions.
    softcap, scale (default 1/sqrt(D)): as fastgpt.attention. window and dropout_p > 0 are refused
    (module docstring). backend: auto | cpu | cuda | triton. Differentiable in q, k, v; every rank
    must call it (and its backward) with the same shapes and options."""
    group, world, rank = _group_of("ring_attention", group)
    problem, signature = None, []
    try:
        scale, kernels = _check_ring_call(q, k, v, key_padding_mask, window, softcap, dropout_p, scale, backend)
        signature = _signature(q, k, v, causal, key_padding_mask, softcap, scale, backend)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
        problem = error
    description = "" if problem else (
        f"q {tuple(q.shape)}, k, v {tuple(k.shape)} {q.dtype}, causal={bool(causal)}, key_padding_mask "
        f"{'given' if key_padding_mask is not None else 'None'}, scale={scale}, softcap={softcap}, backend={backend!r}, "
        f"grad {'on' if signature[-1] else 'off'}")
    _check_ranks_agree("ring_attention", group, signature, problem, description)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), key_padding_mask, bool(causal), scale,
                                0.0 if softcap is None else float(softcap), _Ring(group, world, rank), kernels)


# ---- models on sequence shards

def _ring_attend(module: _CausalSelfAttention, group, q, k, v, window, *, causal=True, key_padding_mask=None):
    """module.attend (fastgpt.nn) with ring_attention in place of fastgpt.attention."""
    B, _, T, _ = q.shape
    dropout_p = module.dropout.p if module.training else 0.0
    context = ring_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, window=window,
                             softcap=module.softcap, dropout_p=dropout_p, scale=module.scale, group=group,
                             backend=module.backend)  # (B, H, T, D)
    context = context.transpose(1, 2).reshape(B, T, module.qkv_sizes[0])  # (B, T, H * D)
    return context if module.out_proj is None else module.out_proj(context)


class ContextParallel(nn.Module):
    """A fastgpt model (fastgpt.models: GPT-2, Llama 3, Qwen 3) run on this rank's sequence shard.

    forward(in_idx): in_idx (B, T/N), this rank's shard of the token ids (shard(ids, 1, group))
    -> this rank's logits (B, T/N, vocab_size), equal to shard(model(ids), 1, group). While it
    runs, the model's positions are the global ones of the tokens this rank holds (so learned
    and rotary position embeddings see them) and every attention is ring_attention over the group;
    the model itself is left as it was (generate() on it runs as usual).

    Training: each rank back-propagates the mean loss of its own tokens, as a data-parallel
    replica does. Ring attention's backward gives each rank every rank's contribution to the
    gradients of its keys and values, so averaging the parameter gradients over the group
    (DistributedDataParallel / FSDP over it do) yields the gradient of the whole sequence's mean
    loss; mean_over_ranks(loss, group) is that loss itself.
    """

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        self.module = model
        self.group = group

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        group, world, _ = _group_of("context_parallel", self.group)
        if in_idx.dim() != 2:
            raise ValueError(f"fastgpt.context_parallel: in_idx must be (B, T/N) token ids of this rank's shard, "
                             f"got shape {tuple(in_idx.shape)}")
        length = in_idx.shape[1] * world  # T
        positions = shard(torch.arange(length, device=in_idx.device), 0, group)  # (T/N,) global positions
        with _on_shards(self.module, positions, length, group):
            return self.module(in_idx)


@contextmanager
def _on_shards(model: nn.Module, positions: torch.Tensor, length: int, group):
    """Points model.positions (models.generation) at `positions` and every attention's attend at
    ring_attention for the duration (instance attributes over the class's methods)."""
    context_length = model.cfg["context_length"]

    def shard_positions(in_idx, kv_cache, input_pos):
        if kv_cache or input_pos is not None:
            raise ValueError("fastgpt.context_parallel: kv_cache must be None: a model on sequence shards runs "
                             "whole sequences (training, scoring); generate with the model itself")
        if length > context_length:
            raise ValueError(f"fastgpt.context_parallel: the sequence ({length} tokens over the ranks) must fit "
                             f"the context_length {context_length}, got {length}")
        return positions

    attentions = [module for module in model.modules() if isinstance(module, _CausalSelfAttention)]
    model.positions = shard_positions
    for module in attentions:
        module.attend = partial(_ring_attend, module, group)
    try:
        yield
    finally:
        del model.positions
        for module in attentions:
            del module.attend


def context_parallel(model: nn.Module, group=None) -> ContextParallel:
    """`model` on sequence shards over `group` (default: the world): see ContextParallel."""
    return ContextParallel(model, group)


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of a (detached) scalar over the ranks of `group`, on every rank: the loss of the whole
    sequence from each rank's mean loss over its shard (every shard holds the same number of tokens)."""
    group, world, _ = _group_of("mean_over_ranks", group)
    total = value.detach().clone()
    dist.all_reduce(total, group=group)
    return total / world


def spawn_local_group(fn, world: int, args: tuple, timeout_s: float) -> bool:
    """Runs fn(rank, world, port, *args) in `world` spawned processes on this machine, port a free
    localhost port for their process group's rendezvous (MASTER_PORT). Waits at most timeout_s:
    True when every process finished, False when some did not (they are killed). A process that
    raises re-raises here (torch.multiprocessing's ProcessRaisedException). For tests and benchmarks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            return False
    return True


__all__ = ["shard", "unshard", "ring_attention", "context_parallel", "ContextParallel", "mean_over_ranks",
           "BLOCK_KERNELS"]
