"""Every named model config of fastgpt, as plain data, and the one lookup: model_config(name).

Families and their keys (the book's):
- gpt2 (chapter 4's GPT_CONFIG_124M): vocab_size, context_length, emb_dim, n_heads,
  n_layers, drop_rate, qkv_bias. CONFIGS / CONFIG_NAMES hold this family (GPT-2 sizes and
  the laptop ones): what `fastgpt train` takes.
- llama3, qwen3, gemma3 (the book's Llama 3.2 / Qwen 3 / Gemma 3 chapters): vocab_size,
  context_length, emb_dim, n_heads, n_layers, hidden_dim (feed-forward width),
  n_kv_groups (key/value heads), rope_base (RoPE theta), and optionally head_dim (None:
  emb_dim // n_heads), qk_norm, rope_freq (the book's Llama 3 RoPE frequency scaling:
  factor, low_freq_factor, high_freq_factor, original_context_length; or {"type":
  "linear", "factor": f}), norm_eps (RMSNorm eps), qkv_bias, dtype (the parameters'; None:
  float32 — the book's configs say bfloat16 for its downloaded weights). Gemma 3 adds
  layer_types (per layer "sliding_attention" or "full_attention"), sliding_window,
  rope_local_base (RoPE theta of the sliding layers; rope_base and rope_freq are the
  full layers'), query_pre_attn_scalar, and optionally attn_softcap / final_softcap.
model_config(name) looks up every family; family_of(name) says which one a name is.
Every family has a laptop-sized `<family>-small` (gpt2's is `small`: 4 layers, 256 dims, context 256) and a
`<family>-tiny` (`tiny`) for tests. The train and generate commands and the model benchmark
(`fastgpt bench model --arch ...`) all resolve their --config through model_config.
"""
from __future__ import annotations

CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")

# The book's GPT-2 sizes. drop_rate 0.1 and qkv_bias False are its values for training
# from scratch (chapter 4); OpenAI's released weights have query/key/value biases,
# so fastgpt.load_gpt2 builds its model with qkv_bias True (as chapter 5 does).
_GPT2_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.1, "qkv_bias": False}
GPT2_CONFIGS = {
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_heads": 12, "n_layers": 12},  # 124M
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_heads": 16, "n_layers": 24},  # 355M
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_heads": 20, "n_layers": 36},  # 774M
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_heads": 25, "n_layers": 48},  # 1558M
}

# Models small enough to train on a laptop CPU (GPT-2's vocabulary and layout, fewer and narrower layers).
_LAPTOP_BASE = {"vocab_size": 50257, "context_length": 256, "drop_rate": 0.1, "qkv_bias": False}
LAPTOP_CONFIGS = {
    "tiny": {**_LAPTOP_BASE, "emb_dim": 64, "n_heads": 4, "n_layers": 2},
    "small": {**_LAPTOP_BASE, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
}

CONFIGS = {**LAPTOP_CONFIGS, **GPT2_CONFIGS}  # the GPT-2 family
CONFIG_NAMES = tuple(CONFIGS)

# ---- Llama 3.2, Qwen 3, Gemma 3 (RoPE, RMSNorm, grouped-query attention, gated feed-forward) ------

ROPE_MODEL_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups",
                   "rope_base")
_ROPE_MODEL_DEFAULTS = {"head_dim": None, "qk_norm": False, "rope_freq": None, "norm_eps": 1e-6, "qkv_bias": False,
                        "dtype": None}
GEMMA3_KEYS = ROPE_MODEL_KEYS + ("layer_types", "sliding_window", "rope_local_base", "query_pre_attn_scalar")
LAYER_TYPES = ("sliding_attention", "full_attention")

# The book's Llama 3.2 (RoPE scaled with its "llama3" frequency adjustment; Meta ties the output head).
_LLAMA32_ROPE_FREQ = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_context_length": 8192}
_LLAMA32_BASE = {"vocab_size": 128_256, "context_length": 131_072, "hidden_dim": 8192, "n_kv_groups": 8,
                 "rope_base": 500_000.0, "rope_freq": _LLAMA32_ROPE_FREQ, "norm_eps": 1e-5}
LLAMA3_CONFIGS = {
    "llama3.2-1b": {**_LLAMA32_BASE, "emb_dim": 2048, "n_heads": 32, "n_layers": 16},
    "llama3.2-3b": {**_LLAMA32_BASE, "emb_dim": 3072, "n_heads": 24, "n_layers": 28},
    "llama3-tiny": {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                    "hidden_dim": 128, "n_kv_groups": 2, "rope_base": 500_000.0, "norm_eps": 1e-5,
                    "rope_freq": {**_LLAMA32_ROPE_FREQ, "factor": 8.0, "original_context_length": 64}},
    # laptop size (as GPT-2's "small": 4 layers, 256 dims, context 256): what `fastgpt bench model` times on a CPU
    "llama3-small": {"vocab_size": 50257, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
                     "hidden_dim": 768, "n_kv_groups": 2, "rope_base": 500_000.0, "norm_eps": 1e-5,
                     "rope_freq": {**_LLAMA32_ROPE_FREQ, "factor": 8.0, "original_context_length": 64}},
}

# The book's Qwen 3 dense models (head_dim 128 and QK-norm throughout).
_QWEN3_BASE = {"vocab_size": 151_936, "context_length": 40_960, "head_dim": 128, "qk_norm": True, "n_kv_groups": 8,
               "rope_base": 1_000_000.0, "norm_eps": 1e-6}
QWEN3_CONFIGS = {
    "qwen3-0.6b": {**_QWEN3_BASE, "emb_dim": 1024, "n_heads": 16, "n_layers": 28, "hidden_dim": 3072},
    "qwen3-1.7b": {**_QWEN3_BASE, "emb_dim": 2048, "n_heads": 16, "n_layers": 28, "hidden_dim": 6144},
    "qwen3-4b": {**_QWEN3_BASE, "emb_dim": 2560, "n_heads": 32, "n_layers": 36, "hidden_dim": 9728},
    "qwen3-8b": {**_QWEN3_BASE, "emb_dim": 4096, "n_heads": 32, "n_layers": 36, "hidden_dim": 12288},
    "qwen3-14b": {**_QWEN3_BASE, "emb_dim": 5120, "n_heads": 40, "n_layers": 40, "hidden_dim": 17408},
    "qwen3-32b": {**_QWEN3_BASE, "emb_dim": 5120, "n_heads": 64, "n_layers": 64, "hidden_dim": 25600},
    "qwen3-tiny": {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                   "hidden_dim": 128, "head_dim": 32, "qk_norm": True, "n_kv_groups": 2, "rope_base": 1_000_000.0,
                   "norm_eps": 1e-6},
    "qwen3-small": {"vocab_size": 50257, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
                    "hidden_dim": 768, "head_dim": 64, "qk_norm": True, "n_kv_groups": 2, "rope_base": 1_000_000.0,
                    "norm_eps": 1e-6},
}

# The book's Gemma 3 270M: five sliding-window layers (512 keys, RoPE theta 10k) to one global
# layer (theta 1M), multi-query attention with head_dim 256, scores scaled by 256**-0.5.
_GEMMA3_270M_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3
GEMMA3_CONFIGS = {
    "gemma3-270m": {"vocab_size": 262_144, "context_length": 32_768, "emb_dim": 640, "n_heads": 4, "n_layers": 18,
                    "hidden_dim": 2048, "head_dim": 256, "qk_norm": True, "n_kv_groups": 1,
                    "rope_local_base": 10_000.0, "rope_base": 1_000_000.0, "sliding_window": 512,
                    "layer_types": _GEMMA3_270M_LAYERS, "query_pre_attn_scalar": 256, "norm_eps": 1e-6},
    "gemma3-tiny": {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 3,
                    "hidden_dim": 128, "head_dim": 32, "qk_norm": True, "n_kv_groups": 1,
                    "rope_local_base": 10_000.0, "rope_base": 1_000_000.0, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 32, "norm_eps": 1e-6},
    "gemma3-small": {"vocab_size": 50257, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
                     "hidden_dim": 768, "head_dim": 64, "qk_norm": True, "n_kv_groups": 1,
                     "rope_local_base": 10_000.0, "rope_base": 1_000_000.0, "sliding_window": 64,
                     "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                     "query_pre_attn_scalar": 64, "norm_eps": 1e-6},
}

FAMILIES = {"gpt2": CONFIGS, "llama3": LLAMA3_CONFIGS, "qwen3": QWEN3_CONFIGS, "gemma3": GEMMA3_CONFIGS}
ALL_CONFIGS = {name: cfg for configs in FAMILIES.values() for name, cfg in configs.items()}
ALL_CONFIG_NAMES = tuple(ALL_CONFIGS)


def family_of(name: str) -> str:
    """The family (gpt2, llama3, qwen3, gemma3) of the config called `name`."""
    for family, configs in FAMILIES.items():
        if name in configs:
            return family
    raise ValueError(f"unknown config {name!r}; expected one of {', '.join(ALL_CONFIG_NAMES)}")


def _check_keys(cfg: dict, family: str, required: tuple, optional: tuple = ()) -> None:
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{family} config is missing {', '.join(missing)}; expected the keys {', '.join(required)}")
    unknown = sorted(set(cfg) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{family} config has unknown keys {', '.join(unknown)}; expected "
                         f"{', '.join(required + tuple(optional))}")


def _check_rope_model_config(cfg: dict, family: str) -> dict:
    optional = dict(_ROPE_MODEL_DEFAULTS)
    if family == "gemma3":
        required = GEMMA3_KEYS
        optional.update(attn_softcap=None, final_softcap=None, qk_norm=True)
    else:
        required = ROPE_MODEL_KEYS
        optional["norm_eps"] = 1e-5 if family == "llama3" else 1e-6
    _check_keys(cfg, family, required, tuple(optional))
    cfg = {**cfg, **{key: value for key, value in optional.items() if key not in cfg}}
    if cfg["n_heads"] % cfg["n_kv_groups"] != 0:
        raise ValueError(f"n_heads ({cfg['n_heads']}) must be a multiple of n_kv_groups ({cfg['n_kv_groups']})")
    if cfg["head_dim"] is None and cfg["emb_dim"] % cfg["n_heads"] != 0:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']}) "
                         f"when head_dim is not set")
    head_dim = cfg["head_dim"] or cfg["emb_dim"] // cfg["n_heads"]
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    freq = cfg["rope_freq"]
    if freq is not None:
        kind = freq.get("type", "llama3")
        keys = {"llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"},
                "linear": {"factor"}}.get(kind)
        if keys is None or not keys <= set(freq):
            raise ValueError(f"rope_freq must be the book's Llama 3 scaling ({{factor, low_freq_factor, "
                             f"high_freq_factor, original_context_length}}) or {{'type': 'linear', 'factor': f}}, "
                             f"got {freq!r}")
    if family == "gemma3":
        types = list(cfg["layer_types"])
        if len(types) != cfg["n_layers"] or not set(types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must list n_layers={cfg['n_layers']} entries of {' or '.join(LAYER_TYPES)}, "
                             f"got {types!r}")
        cfg["layer_types"] = types
        if cfg["sliding_window"] < 1:
            raise ValueError(f"sliding_window must be >= 1, got {cfg['sliding_window']}")
    if freq is not None:
        cfg["rope_freq"] = dict(freq)
    return cfg


def check_config(cfg: dict, family: str = "gpt2") -> dict:
    """A copy of `cfg` once it has its family's keys and consistent sizes (the optional keys of
    llama3 / qwen3 / gemma3 filled with their defaults); else a ValueError."""
    if family != "gpt2":
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        return _check_rope_model_config(cfg, family)
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"GPT config is missing {', '.join(missing)}; expected the keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"GPT config has unknown keys {', '.join(unknown)}; expected {', '.join(CONFIG_KEYS)}")
    if cfg["emb_dim"] % cfg["n_heads"] != 0:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']})")
    return dict(cfg)


def model_config(name: str, **overrides) -> dict:
    """A fresh copy of the config called `name` (tiny, small, gpt2-small, llama3.2-1b, qwen3-0.6b,
    gemma3-270m, ...) with the overrides that are not None replaced, checked by check_config."""
    family = family_of(name)
    return check_config({**FAMILIES[family][name], **{key: value for key, value in overrides.items()
                                                      if value is not None}}, family)


__all__ = ["CONFIG_KEYS", "CONFIG_NAMES", "CONFIGS", "GPT2_CONFIGS", "LAPTOP_CONFIGS", "LLAMA3_CONFIGS",
           "QWEN3_CONFIGS", "GEMMA3_CONFIGS", "FAMILIES", "ALL_CONFIGS", "ALL_CONFIG_NAMES", "ROPE_MODEL_KEYS",
           "GEMMA3_KEYS", "LAYER_TYPES", "check_config", "family_of", "model_config"]
