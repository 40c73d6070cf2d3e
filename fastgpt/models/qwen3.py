"""Qwen 3 (dense) as built in the book's Qwen 3 chapter (ch05/11_qwen3, pkg qwen3.py), on
fastgpt.nn's fused modules.

Qwen3Model is Llama 3's architecture (models.blocks: pre-norm RMSNorm blocks, RoPE,
grouped-query attention, SwiGLU) with a head_dim set independently of emb_dim / n_heads
(128 in every size) and QK-norm: an RMSNorm over head_dim of the queries and of the keys
(att.q_norm, att.k_norm) before RoPE. No RoPE frequency scaling; theta 1e6.
The book's names (its RMSNorm's `scale` loads into `weight`).
Configs: qwen3-0.6b ... qwen3-32b, qwen3-tiny (fastgpt.models.configs.QWEN3_CONFIGS).
"""
from __future__ import annotations

from .blocks import RoPEModel


class Qwen3Model(RoPEModel):
    """Qwen 3: Llama's blocks with QK-norm (cfg["qk_norm"]) and an explicit head_dim."""

    family = "qwen3"


__all__ = ["Qwen3Model"]
