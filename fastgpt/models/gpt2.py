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

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import check_backend_name
from ..nn import KVCache, LayerNorm, MultiHeadAttention
from .configs import check_config
from .generation import Generation


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

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, input_pos=input_pos))  # (B, T, emb_dim)
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(Generation, nn.Module):
    """GPT-2: token + position embeddings, n_layers TransformerBlocks, final norm, output head.

    `backend` picks the attention / layer norm kernels of every block ("auto": the best
    available for the tensors' device, see fastgpt.info()). The output head is not tied
    to the token embedding, as in the book; fastgpt.load_gpt2 ties them as GPT-2 does.
    set_backend, new_kv_cache and generate (KV cache) come from models.generation.Generation.
    """

    family = "gpt2"

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

    def forward(self, in_idx: torch.Tensor, kv_cache: list[KVCache] | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """in_idx (B, T) token ids -> logits (B, T, vocab_size).

        With kv_cache (one per block, from new_kv_cache), in_idx holds the tokens that follow
        the cached ones: their positions start at the cache length, and their keys and values
        are appended. With input_pos ((1,) int64) too, in_idx is one token at that position: a
        static decode step (see Generation.decode_step).
        """
        positions = self.positions(in_idx, kv_cache, input_pos)  # (T,)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))  # (B, T, emb_dim)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_cache[i] if kv_cache else None, input_pos)
        return self.out_head(self.final_norm(x))  # (B, T, vocab_size)


__all__ = ["GPTModel", "TransformerBlock", "FeedForward", "GELU"]
