"""GPT-2 as built in chapter 4 of "Build a Large Language Model (from Scratch)", with the
attention and layer norm of every block being fastgpt.nn's fused modules.

The classes, attribute names and config keys are the book's. What differs:
- attention is fastgpt.nn.MultiHeadAttention: no (T, T) causal-mask buffer (the kernel
  masks by index), and a KV cache for decoding;
- layer norm is fastgpt.nn.LayerNorm: torch's `weight` / `bias` names. The book's
  state_dict (scale/shift, mask buffers) loads as is with load_state_dict, and
  fastgpt.nn.to_book_state_dict(model, context_length=...) gives one the book's GPTModel loads;
- every GPTModel has a `backend` ("auto", "naive", "sdpa", "cpu", "cuda", "triton")
  that all its attention and layer norm calls use;
- generate() decodes with a KV cache (one forward pass over the prompt, then one
  token per step attending to the cached keys and values).
Named configs (gpt2-small ... gpt2-xl, tiny, small) are in fastgpt.models.configs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import check_backend_name
from ..nn import KVCache, LayerNorm, MultiHeadAttention
from .configs import check_config


class GELU(nn.Module):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as one torch op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """emb_dim -> 4 * emb_dim -> GELU -> emb_dim."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: dict, backend: str = "auto"):
        super().__init__()
        self.att = MultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
                                      dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
                                      backend=backend)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"], backend=backend)
        self.norm2 = LayerNorm(cfg["emb_dim"], backend=backend)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))  # (B, T, emb_dim)
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, n_layers TransformerBlocks, final norm, output head.

    `backend` picks the attention / layer norm kernels of every block ("auto": the best
    available for the tensors' device, see fastgpt.info()). The output head is not tied
    to the token embedding, as in the book; fastgpt.load_gpt2 ties them as GPT-2 does.
    """

    def __init__(self, cfg: dict, backend: str = "auto"):
        super().__init__()
        self.cfg = check_config(cfg)
        self.backend = check_backend_name(backend)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, backend) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"], backend=backend)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def set_backend(self, backend: str) -> GPTModel:
        """Routes every attention and layer norm of the model to `backend`."""
        self.backend = check_backend_name(backend)
        for module in self.modules():
            if isinstance(module, (MultiHeadAttention, LayerNorm)):
                module.backend = backend
        return self

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty KVCache per block, for up to max_len (default context_length) tokens."""
        max_len = self.cfg["context_length"] if max_len is None else max_len
        if not 1 <= max_len <= self.cfg["context_length"]:
            raise ValueError(f"max_len must be in [1, context_length={self.cfg['context_length']}], got {max_len}")
        return [block.att.new_kv_cache(batch_size, max_len) for block in self.trf_blocks]

    def forward(self, in_idx: torch.Tensor, kv_cache: list[KVCache] | None = None) -> torch.Tensor:
        """in_idx (B, T) token ids -> logits (B, T, vocab_size).

        With kv_cache (one per block, from new_kv_cache), in_idx holds the tokens that follow
        the cached ones: their positions start at the cache length, and their keys and values
        are appended.
        """
        if in_idx.dim() != 2:
            raise ValueError(f"in_idx must be (B, T) token ids, got shape {tuple(in_idx.shape)}")
        T = in_idx.shape[1]
        start = kv_cache[0].length if kv_cache else 0
        if start + T > self.cfg["context_length"]:
            raise ValueError(f"{start} cached + {T} new tokens exceed context_length {self.cfg['context_length']}")
        positions = torch.arange(start, start + T, device=in_idx.device)  # (T,)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))  # (B, T, emb_dim)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_cache[i] if kv_cache else None)
        return self.out_head(self.final_norm(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
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

        eos_id: a sequence that emitted eos_id keeps emitting it; generation stops once
        every sequence has. Unlike the book, the eos token is kept in the output.
        """
        if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be (B, T) integer token ids with T >= 1, got {idx.dtype} {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.cfg["vocab_size"]:
            raise ValueError(f"top_k must be None or in [1, vocab_size={self.cfg['vocab_size']}], got {top_k}")
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
                next_id = _pick_next(logits[:, -1, :], temperature, top_k)  # (B, 1)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished[:, None], eos_id)
                    finished |= next_id[:, 0] == eos_id
                idx = torch.cat([idx, next_id], dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx


def _pick_next(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B, 1), as the book's generate picks them."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, vocab)
    return torch.multinomial(probs, num_samples=1)


__all__ = ["GPTModel", "TransformerBlock", "FeedForward", "GELU"]
