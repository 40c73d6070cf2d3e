"""The parts Llama 3, Qwen 3 and Gemma 3 share, on fastgpt.nn's fused modules:

- compute_rope_params: the RoPE cos / sin tables (the book's function of the same name:
  split-halves layout, optional Llama 3 frequency scaling), computed once per model;
- FeedForward: the gated feed-forward fc3(act(fc1(x)) * fc2(x)) — SwiGLU (SiLU; Llama,
  Qwen) or GeGLU (tanh GELU; Gemma), the book's fc1 / fc2 / fc3 names;
- TransformerBlock: the pre-norm block of Llama and Qwen (norm1, att, norm2, ff), whose
  residual add and second norm are one fused add_rms_norm;
- RoPEModel: token embedding -> blocks -> final RMSNorm -> out_head, with the RoPE tables
  as (non-persistent) buffers, KV-cache forward and generate (models.generation).

No T×T mask anywhere: every attention is causal by index inside the kernel, and sliding
layers pass their window to fastgpt.attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import check_backend_name
from ..nn import GroupedQueryAttention, KVCache, RMSNorm
from .configs import check_config
from .generation import Generation

_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def compute_rope_params(head_dim: int, theta_base: float = 10_000.0, context_length: int = 4096,
                        freq_config: dict | None = None, dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (context_length, head_dim) float32: position p, column c holds the angle
    p * inv_freq[c mod head_dim/2], inv_freq[i] = theta_base ** (-2i / head_dim).

    freq_config: None, the book's Llama 3 scaling {factor, low_freq_factor, high_freq_factor,
    original_context_length} (wavelengths above original/low_freq_factor are divided by factor,
    those below original/high_freq_factor are kept, the ones between blend smoothly), or
    {"type": "linear", "factor": f} (every frequency divided by f: Gemma 3's global layers).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # (D/2,)
    if freq_config is not None:
        factor = freq_config["factor"]
        if freq_config.get("type", "llama3") == "linear":
            inv_freq = inv_freq / factor
        else:
            original = freq_config["original_context_length"]
            low, high = freq_config["low_freq_factor"], freq_config["high_freq_factor"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
            smooth = (original / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen <= original / low) & (wavelen >= original / high)
            inv_freq = torch.where(medium, blended, scaled)
    positions = torch.arange(context_length, dtype=dtype).float()
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, D/2)
    angles = torch.cat([angles, angles], dim=1)  # (context_length, D): the split-halves layout
    return angles.cos(), angles.sin()


class FeedForward(nn.Module):
    """Gated feed-forward: emb_dim -> fc3(act(fc1(x)) * fc2(x)) -> emb_dim, no biases.
    activation "silu" (SwiGLU: Llama, Qwen) or "gelu_tanh" (GeGLU: Gemma)."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: str = "silu", dtype=None, device=None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        factory = {"dtype": dtype, "device": device}
        self.fc1 = nn.Linear(emb_dim, hidden_dim, bias=False, **factory)  # gate (HF gate_proj)
        self.fc2 = nn.Linear(emb_dim, hidden_dim, bias=False, **factory)  # up (HF up_proj)
        self.fc3 = nn.Linear(hidden_dim, emb_dim, bias=False, **factory)  # down (HF down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, emb_dim) -> (B, T, emb_dim)
        return self.fc3(_ACTIVATIONS[self.activation](self.fc1(x)) * self.fc2(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def block_attention(cfg: dict, backend: str, *, window: int | None = None, norm_offset: float = 0.0
                    ) -> GroupedQueryAttention:
    """The attention of one block of a RoPE model config (see configs.py for the keys)."""
    return GroupedQueryAttention(cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], head_dim=cfg["head_dim"],
                                 qk_norm=cfg["qk_norm"], query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                                 dtype=cfg["dtype"], qkv_bias=cfg["qkv_bias"], window=window,
                                 softcap=cfg.get("attn_softcap"), norm_eps=cfg["norm_eps"], norm_offset=norm_offset,
                                 context_length=cfg["context_length"], backend=backend)


class TransformerBlock(nn.Module):
    """Llama / Qwen pre-norm block: h = x + att(norm1(x)), then h + ff(norm2(h)); the add
    and norm2 are one fastgpt.add_rms_norm. `rope_kind` names the RoPE tables it uses."""

    rope_kind = ""

    def __init__(self, cfg: dict, backend: str = "auto", activation: str = "silu"):
        super().__init__()
        self.att = block_attention(cfg, backend)
        self.ff = FeedForward(cfg["emb_dim"], cfg["hidden_dim"], activation, dtype=cfg["dtype"])
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"], backend=backend)
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"], backend=backend)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.att(self.norm1(x), kv_cache, rope=rope, input_pos=input_pos)  # (B, T, emb_dim)
        normed, x = self.norm2.forward_add(attended, x)  # norm2(x + attended), x + attended
        return x + self.ff(normed)


def _dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (float32, bfloat16, ...), got {name!r}")
    return dtype


class RoPEModel(Generation, nn.Module):
    """tok_emb -> trf_blocks (each with a `rope_kind`) -> final_norm -> out_head.

    Subclasses set `family` (the config family) and build the blocks in `_blocks`;
    `_rope_tables` says which RoPE tables the model holds: {kind: (theta_base, freq_config)},
    stored as buffers cos{kind} / sin{kind} (the book's names: cos, sin; cos_local, ...).
    The output head is not tied to the token embedding (as in the book); the loaders of
    fastgpt.weights tie them when the checkpoint does.
    """

    family = ""
    norm_offset = 0.0

    def __init__(self, cfg: dict, backend: str = "auto"):
        super().__init__()
        cfg = check_config(cfg, self.family)
        cfg["dtype"] = _dtype(cfg["dtype"])
        self.cfg = cfg
        self.backend = check_backend_name(backend)
        self.head_dim = cfg["head_dim"] or cfg["emb_dim"] // cfg["n_heads"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        self.trf_blocks = nn.ModuleList(self._blocks(cfg, backend))
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], offset=self.norm_offset, dtype=cfg["dtype"],
                                  backend=backend)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        self.reset_rope()

    def _blocks(self, cfg: dict, backend: str) -> list[nn.Module]:
        return [TransformerBlock(cfg, backend) for _ in range(cfg["n_layers"])]

    def _rope_tables(self) -> dict[str, tuple[float, dict | None]]:
        return {"": (self.cfg["rope_base"], self.cfg["rope_freq"])}

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the RoPE tables, float32, on `device` (default: the token embedding's).
        On the meta device they are placeholders: the loaders build on meta, assign the weights,
        then call reset_rope("cpu")."""
        device = torch.device(self.tok_emb.weight.device if device is None else device)
        for kind, (theta_base, freq_config) in self._rope_tables().items():
            if device.type == "meta":
                cos = sin = torch.empty(self.cfg["context_length"], self.head_dim, device=device)
            else:
                with torch.device("cpu"):
                    cos, sin = compute_rope_params(self.head_dim, theta_base, self.cfg["context_length"],
                                                   freq_config)
            self.register_buffer(f"cos{kind}", cos.to(device), persistent=False)  # (context_length, head_dim)
            self.register_buffer(f"sin{kind}", sin.to(device), persistent=False)

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(in_idx)  # (B, T, emb_dim)

    def forward(self, in_idx: torch.Tensor, kv_cache: list[KVCache] | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """in_idx (B, T) token ids -> logits (B, T, vocab_size).

        With kv_cache (one per block, from new_kv_cache), in_idx holds the tokens that follow
        the cached ones: their positions start at the cache length. With input_pos ((1,) int64)
        too, in_idx is one token at that position: a static decode step (Generation.decode_step)."""
        positions = self.positions(in_idx, kv_cache, input_pos)  # (T,)
        ropes = {kind: (getattr(self, f"cos{kind}")[positions], getattr(self, f"sin{kind}")[positions])
                 for kind in self._rope_tables()}  # each (T, head_dim)
        x = self.embed(in_idx)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_cache[i] if kv_cache else None, rope=ropes[block.rope_kind], input_pos=input_pos)
        logits = self.out_head(self.final_norm(x))  # (B, T, vocab_size)
        cap = self.cfg.get("final_softcap")
        return logits if cap is None else cap * torch.tanh(logits / cap)


__all__ = ["compute_rope_params", "FeedForward", "TransformerBlock", "RoPEModel", "block_attention"]
