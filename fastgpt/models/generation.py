"""KV-cache text generation, shared by every model of fastgpt.models (GPT-2, Llama 3, Qwen 3, Gemma 3).

A model mixes in `Generation` and provides: `cfg` with context_length and vocab_size,
`trf_blocks` whose `att` is a fastgpt.nn attention module (for new_kv_cache), and
forward(in_idx (B, T), kv_cache=None) -> logits (B, T, vocab) that starts its positions at
the cache length.
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
                    logits = self(idx[:, -1:], cache)  # one new token, Tq = 1 < Tk
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
