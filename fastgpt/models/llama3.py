"""Llama 3.2 as built in the book's Llama chapter (ch05/07_gpt_to_llama, pkg llama3.py), on
fastgpt.nn's fused modules.

Llama3Model: token embedding (no position embedding: RoPE on queries and keys, theta
rope_base, with the book's "llama3" frequency scaling rope_freq), n_layers pre-norm
TransformerBlocks (RMSNorm eps norm_eps, grouped-query attention with n_kv_groups key /
value heads, SwiGLU feed-forward of width hidden_dim), final RMSNorm, output head.
The book's attribute names (tok_emb, trf_blocks, att.W_query/W_key/W_value/out_proj,
ff.fc1/fc2/fc3, norm1, norm2, final_norm, out_head), so its state_dict loads as is.
Configs: llama3.2-1b, llama3.2-3b, llama3-tiny (fastgpt.models.configs.LLAMA3_CONFIGS).
"""
from __future__ import annotations

from .blocks import RoPEModel


class Llama3Model(RoPEModel):
    """Llama 3.x: RoPE + RMSNorm + grouped-query attention + SwiGLU. cfg: a llama3 config."""

    family = "llama3"


__all__ = ["Llama3Model"]
