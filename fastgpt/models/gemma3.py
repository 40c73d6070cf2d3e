"""Gemma 3 (text) as built in the book's Gemma 3 chapter (ch05/12_gemma3), on fastgpt.nn's fused modules.

What Gemma 3 adds to Llama's blocks (models.blocks):
- layer_types: most layers attend to a sliding window of the last sliding_window keys
  ("sliding_attention", RoPE theta rope_local_base), every few layers one attends to all
  ("full_attention", RoPE theta rope_base, scaled by rope_freq if set): two RoPE tables,
  cos_local / sin_local and cos_global / sin_global. The window goes to fastgpt.attention;
  the KV cache is the same static cache for every layer (the kernel skips keys outside it);
- multi-query attention (n_kv_groups 1 in the 270M) with head_dim 256 and scores scaled by
  query_pre_attn_scalar ** -0.5; QK-norm;
- every RMSNorm is zero-centred: x̂ · (1 + weight) (fastgpt.nn.RMSNorm offset=1.0);
- four norms per block: input_layernorm -> att -> post_attention_layernorm, added to the
  residual, pre_feedforward_layernorm -> ff (GeGLU: tanh GELU) -> post_feedforward_layernorm,
  added to the residual (the middle add and norm are one fused add_rms_norm);
- the token embedding is multiplied by sqrt(emb_dim) (rounded to the weights' dtype, as
  transformers does); the output head is tied to the embedding in Google's checkpoints.
The book's names (its `blocks.N` load into trf_blocks.N, its RMSNorm `scale` into weight).
Configs: gemma3-270m, gemma3-tiny (fastgpt.models.configs.GEMMA3_CONFIGS).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import KVCache, RMSNorm
from .blocks import FeedForward, RoPEModel, block_attention


class Gemma3Block(nn.Module):
    """x + post_attention_layernorm(att(input_layernorm(x))), then
    h + post_feedforward_layernorm(ff(pre_feedforward_layernorm(h)))."""

    def __init__(self, cfg: dict, layer_type: str, backend: str = "auto"):
        super().__init__()
        self.layer_type = layer_type
        self.rope_kind = "_local" if layer_type == "sliding_attention" else "_global"
        window = cfg["sliding_window"] if layer_type == "sliding_attention" else None
        self.att = block_attention(cfg, backend, window=window, norm_offset=1.0)
        self.ff = FeedForward(cfg["emb_dim"], cfg["hidden_dim"], "gelu_tanh", dtype=cfg["dtype"])
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], offset=1.0, dtype=cfg["dtype"],
                                        backend=backend))

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.post_attention_layernorm(self.att(self.input_layernorm(x), kv_cache, rope=rope,
                                                          input_pos=input_pos))
        normed, x = self.pre_feedforward_layernorm.forward_add(attended, x)  # norm(x + attended), x + attended
        return x + self.post_feedforward_layernorm(self.ff(normed))

    def extra_repr(self) -> str:
        return f"layer_type={self.layer_type!r}"


class Gemma3Model(RoPEModel):
    """Gemma 3: sliding / full layers, (1 + w) RMSNorms, scaled embedding. cfg: a gemma3 config."""

    family = "gemma3"
    norm_offset = 1.0

    def _blocks(self, cfg: dict, backend: str) -> list[nn.Module]:
        return [Gemma3Block(cfg, layer_type, backend) for layer_type in cfg["layer_types"]]

    def _rope_tables(self) -> dict[str, tuple[float, dict | None]]:
        return {"_local": (self.cfg["rope_local_base"], None),
                "_global": (self.cfg["rope_base"], self.cfg["rope_freq"])}

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight
        return self.tok_emb(in_idx) * torch.tensor(self.cfg["emb_dim"] ** 0.5, dtype=weight.dtype,
                                                   device=weight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The book's Gemma3Model names its block list `blocks`.
        for key in [key for key in state_dict if key.startswith(prefix + "blocks.")]:
            state_dict[prefix + "trf_" + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["Gemma3Model", "Gemma3Block"]
