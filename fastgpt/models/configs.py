"""Every named model config of fastgpt, as plain data, and the one lookup: model_config(name).

The keys are the book's (chapter 4's GPT_CONFIG_124M): vocab_size, context_length,
emb_dim, n_heads, n_layers, drop_rate, qkv_bias. The train and generate commands and
the GPT benchmark all resolve their --config through model_config.
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

CONFIGS = {**LAPTOP_CONFIGS, **GPT2_CONFIGS}
CONFIG_NAMES = tuple(CONFIGS)


def check_config(cfg: dict) -> dict:
    """A copy of `cfg` once it has exactly CONFIG_KEYS and emb_dim divides into n_heads; else a ValueError."""
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
    """A fresh copy of the config called `name` (tiny, small, gpt2-small, ...) with the
    overrides that are not None replaced, checked by check_config."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; expected one of {', '.join(CONFIG_NAMES)}")
    return check_config({**CONFIGS[name], **{key: value for key, value in overrides.items() if value is not None}})


__all__ = ["CONFIG_KEYS", "CONFIG_NAMES", "CONFIGS", "GPT2_CONFIGS", "LAPTOP_CONFIGS", "check_config",
           "model_config"]
