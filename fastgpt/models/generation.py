"""KV-cache text generation, shared by every model of fastgpt.models (GPT-2, Llama 3, Qwen 3, Gemma 3).

A model mixes in `Generation` and provides: `cfg` with context_length and vocab_size,
`trf_blocks` whose `att` is a fastgpt.nn attention module (for new_kv_cache), and
forward(in_idx (B, T), kv_cache=None, input_pos=None) -> logits (B, T, vocab) that takes its
positions from `positions` (the cache length on, or input_pos).

Decoding (gpt-fast's static KV cache): the prompt goes through forward once (prefill, appending
to each block's KVCache); then every new token is a `decode_step`: one token at position
input_pos, its keys and values written in place into the preallocated cache and attended over
the whole allocation with a mask (fastgpt.nn.KVCache.write_at). All steps have the same shapes
and read no Python number that changes between them, so `compile_decode()` makes the step one
torch.compile graph for every position; the attention kernels' decode path (Tq <= 16, split over
the keys) skips the masked tail of the cache.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..backends import check_backend_name
from ..nn import KVCache, LayerNorm, RMSNorm, _CausalSelfAttention


class Generation:
    """new_kv_cache, set_backend and the book's generate (with a KV cache) for a model."""

    def set_backend(self, backend: str):
        """Routes every attention and norm of the model to `backend`."""
        self.backend = check_backend_name(backend)
        for module in self.modules():
            if isinstance(module, (_CausalSelfAttention, LayerNorm, RMSNorm)):
                module.backend = backend
        return self

    def positions(self, in_idx: torch.Tensor, kv_cache: list[KVCache] | None,
                  input_pos: torch.Tensor | None) -> torch.Tensor:
        """The positions (T,) of in_idx's tokens: input_pos in a static decode step, else they follow
        the cached tokens. Checks in_idx and that the context holds them."""
        if in_idx.dim() != 2:
            raise ValueError(f"in_idx must be (B, T) token ids, got shape {tuple(in_idx.shape)}")
        T = in_idx.shape[1]
        if input_pos is not None:
            if not kv_cache or T != 1 or input_pos.shape != (1,):
                raise ValueError("input_pos (a static decode step) takes one token per sequence, a (1,) position "
                                 f"and the KV cache; got in_idx {tuple(in_idx.shape)}, input_pos "
                                 f"{tuple(input_pos.shape)}, kv_cache {'given' if kv_cache else 'None'}")
            return input_pos
        start = kv_cache[0].length if kv_cache else 0
        if start + T > self.cfg["context_length"]:
            raise ValueError(f"{start} cached + {T} new tokens exceed context_length {self.cfg['context_length']}")
        return torch.arange(start, start + T, device=in_idx.device)

    def decode_step(self, next_ids: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        """next_ids (B, 1), the token after the cached ones -> logits (B, 1, vocab): a static decode
        step (module docstring), through the compiled forward after compile_decode(). Advances the
        caches by one."""
        length = cache[0].length
        if length >= cache[0].max_len:
            raise ValueError(f"the KV cache is full ({length} of {cache[0].max_len} tokens)")
        input_pos = torch.full((1,), length, dtype=torch.long, device=next_ids.device)
        # Standard strides: a column sliced off the growing ids would give every step new strides
        # (and the compiled step a recompile).
        next_ids = next_ids.clone(memory_format=torch.contiguous_format)
        logits = (self._compiled_decode or self.forward)(next_ids, cache, input_pos)
        for block_cache in cache:
            block_cache.length += 1
        return logits

    _compiled_decode = None

    def compile_decode(self, **compile_options):
        """From now on decode_step (and so generate) runs its forward through torch.compile
        (fullgraph=True; compile_options are passed on, e.g. mode= or backend=): one graph serves
        every position. Call again to recompile with other options."""
        self._compiled_decode = torch.compile(self.forward, fullgraph=True, **compile_options)
        return self

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty KVCache per block, for up to max_len (default context_length) tokens."""
        max_len = self.cfg["context_length"] if max_len is None else max_len
        if not 1 <= max_len <= self.cfg["context_length"]:
            raise ValueError(f"max_len must be in [1, context_length={self.cfg['context_length']}], got {max_len}")
        return [block.att.new_kv_cache(batch_size, max_len) for block in self.trf_blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | Iterable[int] | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """idx (B, T) prompt ids -> (B, T + n) ids: the prompt followed by n <= max_new_tokens new tokens.

        The book's generate: greedy when temperature == 0, else keep the top_k logits
        (all when None), divide by temperature and sample (torch.manual_seed makes it
        repeatable). Runs in eval mode and restores the training mode afterwards.

        Context: the model sees at most the last context_length tokens, as in the book
        (a longer prompt is cropped for the model; the returned ids keep all of it).
        With use_cache, the prompt is processed once and each step feeds one token
        against the KV cache; once the cache holds context_length tokens, the window
        slides and the remaining steps recompute the last context_length tokens without
        a cache, exactly like use_cache=False (whose every step does so).

        eos_id: one id or several (Llama 3 instruct models end on any of a few). A sequence
        that emitted one keeps emitting it; generation stops once every sequence has. Unlike
        the book, the eos token is kept in the output.
        """
        if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be (B, T) integer token ids with T >= 1, got {idx.dtype} {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.cfg["vocab_size"]:
            raise ValueError(f"top_k must be None or in [1, vocab_size={self.cfg['vocab_size']}], got {top_k}")
        eos = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                       device=idx.device)
        context = self.cfg["context_length"]
        idx = idx.long()
        was_training = self.training
        self.eval()
        try:
            B, T = idx.shape
            cache = self.new_kv_cache(B, min(T + max_new_tokens, context)) if use_cache else None
            finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                if cache is None or cache[0].length == cache[0].max_len:
                    logits = self(idx[:, -context:])  # no cache, or the window slides past it
                elif cache[0].length == 0:
                    logits = self(idx[:, -context:], cache)  # prefill: the whole prompt at once
                else:
                    logits = self.decode_step(idx[:, -1:], cache)  # one new token, Tq = 1 < Tk
                next_id = pick_next(logits[:, -1, :], temperature, top_k)  # (B, 1)
                if eos is not None:
                    next_id = torch.where(finished[:, None], idx[:, -1:], next_id)  # finished rows repeat their eos
                    finished |= torch.isin(next_id[:, 0], eos)
                idx = torch.cat([idx, next_id], dim=1)
                if eos is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B, 1), as the book's generate picks them."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    return torch.multinomial(probs, num_samples=1)


__all__ = ["Generation", "pick_next"]
