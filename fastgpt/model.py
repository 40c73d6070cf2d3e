"""GPT-2 as built in chapter 4 of "Build a Large Language Model (from Scratch)",
with the attention and layer norm of every block routed through fastgpt's kernels.

The classes, attribute names and config keys are the book's, so the book's
state_dict loads as is (see fastgpt.weights). What differs:
- MultiHeadAttention keeps no (T, T) causal-mask buffer: fastgpt.attention applies
  the causal mask itself, so the model never materialises one;
- every GPTModel has a `backend` ("auto", "naive", "sdpa", "cpu", "cuda", "triton")
  that all its attention and layer norm calls use;
- generate() decodes with a KV cache (one forward pass over the prompt, then one
  token per step attending to the cached keys and values).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import BACKEND_NAMES, check_backend_name
from .ops import attention, layer_norm

# The book's configs. drop_rate 0.1 and qkv_bias False are its values for training
# from scratch (chapter 4); OpenAI's released weights have query/key/value biases,
# so fastgpt.load_gpt2 builds its model with qkv_bias True (as chapter 5 does).
_GPT2_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}
GPT2_CONFIGS = {
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_heads": 12, "n_layers": 12},  # 124M
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_heads": 16, "n_layers": 24},  # 355M
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_heads": 20, "n_layers": 36},  # 774M
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_heads": 25, "n_layers": 48},  # 1558M
}
CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


class KVCache:
    """The keys and values one attention layer has seen so far, pre-allocated for max_len tokens."""

    def __init__(self, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.keys = torch.zeros(batch_size, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)  # (B, H, max_len, Dh), filled up to `length`
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores keys, values (B, H, T, Dh); returns all cached ones (B, H, length + T, Dh)."""
        end = self.length + keys.shape[2]
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class MultiHeadAttention(nn.Module):
    """The book's causal multi-head attention; the masked softmax runs in fastgpt.attention."""

    def __init__(self, d_in: int, d_out: int, dropout: float, num_heads: int, qkv_bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = dropout  # on the attention weights, inside the kernel (Philox mask)
        self.backend = check_backend_name(backend)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, d_out) -> (B, H, T, Dh)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape  # x (B, T, d_in)
        queries = self._heads(self.W_query(x))  # (B, H, T, Dh)
        keys = self._heads(self.W_key(x))  # (B, H, T, Dh)
        values = self._heads(self.W_value(x))  # (B, H, T, Dh)
        if kv_cache is not None:
            keys, values = kv_cache.append(keys, values)  # (B, H, Tk, Dh), Tk = cached + T
        # Causal with Tq <= Tk is bottom-right aligned: new query i sees keys j <= i + (Tk - T).
        context = attention(queries, keys, values, causal=True,
                            dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # (B, H, T, Dh) -> (B, T, d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    """The book's LayerNorm (scale, shift, biased variance, eps 1e-5) via fastgpt.layer_norm."""

    def __init__(self, emb_dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))
        self.backend = check_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.scale, self.shift, self.eps, backend=self.backend)  # (..., emb_dim)


class GELU(nn.Module):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as one torch op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
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
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["drop_rate"], cfg["n_heads"],
                                      cfg["qkv_bias"], backend)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"], backend=backend)
        self.norm2 = LayerNorm(cfg["emb_dim"], backend=backend)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))  # (B, T, emb_dim)
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


def check_config(cfg: dict) -> dict:
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"GPT config is missing {', '.join(missing)}; expected the keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"GPT config has unknown keys {', '.join(unknown)}; expected {', '.join(CONFIG_KEYS)}")
    if cfg["emb_dim"] % cfg["n_heads"] != 0:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']})")
    return dict(cfg)


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
        weight = self.tok_emb.weight
        head_dim = self.cfg["emb_dim"] // self.cfg["n_heads"]
        return [KVCache(batch_size, self.cfg["n_heads"], max_len, head_dim, weight.dtype, weight.device)
                for _ in self.trf_blocks]

    def forward(self, in_idx: torch.Tensor, kv_cache: list[KVCache] | None = None) -> torch.Tensor:
        """in_idx (B, T) token ids -> logits (B, T, vocab_size).

        With kv_cache, in_idx holds the tokens that follow the cached ones: their
        positions start at the cache length, and their keys and values are appended.
        """
        if in_idx.dim() != 2:
            raise ValueError(f"in_idx must be (B, T) token ids, got shape {tuple(in_idx.shape)}")
        B, T = in_idx.shape
        start = kv_cache[0].length if kv_cache else 0
        if start + T > self.cfg["context_length"]:
            raise ValueError(f"{start} cached + {T} new tokens exceed context_length {self.cfg['context_length']}")
        if kv_cache and (kv_cache[0].keys.shape[0] != B or start + T > kv_cache[0].max_len):
            raise ValueError(f"the KV cache holds batch {kv_cache[0].keys.shape[0]} x {kv_cache[0].max_len} tokens; "
                             f"got batch {B} with {start} cached + {T} new tokens")
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
