"""The models of fastgpt, built on fastgpt.nn's fused modules, one module each:
gpt2 (the book's GPT-2), llama3 (Llama 3.2), qwen3 (Qwen 3), gemma3 (Gemma 3); blocks holds
what the last three share (RoPE tables, gated feed-forward, pre-norm block, the model
skeleton) and generation the KV-cache generate every model uses.

Named configs (one registry for the library, the train and generate commands and the
benchmarks) are in `configs`: model_config("tiny"), GPT2_CONFIGS["gpt2-small"],
model_config("llama3.2-1b"), ...; build_model(name) makes the model a config name belongs to.
"""
from . import blocks, configs, gemma3, generation, gpt2, llama3, qwen3
from .configs import (ALL_CONFIG_NAMES, ALL_CONFIGS, CONFIG_NAMES, CONFIGS, FAMILIES, GEMMA3_CONFIGS, GPT2_CONFIGS,
                      LAPTOP_CONFIGS, LLAMA3_CONFIGS, QWEN3_CONFIGS, check_config, family_of, model_config)
from .gemma3 import Gemma3Model
from .gpt2 import GPTModel
from .llama3 import Llama3Model
from .qwen3 import Qwen3Model

MODEL_CLASSES = {"gpt2": GPTModel, "llama3": Llama3Model, "qwen3": Qwen3Model, "gemma3": Gemma3Model}


def build_model(name: str, backend: str = "auto", **overrides):
    """The model of the config called `name` (any family), randomly initialised;
    overrides replace config keys (None: keep)."""
    return MODEL_CLASSES[family_of(name)](model_config(name, **overrides), backend=backend)


__all__ = ["configs", "blocks", "generation", "gpt2", "llama3", "qwen3", "gemma3", "GPTModel", "Llama3Model",
           "Qwen3Model", "Gemma3Model", "MODEL_CLASSES", "build_model", "GPT2_CONFIGS", "LAPTOP_CONFIGS",
           "LLAMA3_CONFIGS", "QWEN3_CONFIGS", "GEMMA3_CONFIGS", "CONFIGS", "CONFIG_NAMES", "ALL_CONFIGS",
           "ALL_CONFIG_NAMES", "FAMILIES", "check_config", "family_of", "model_config"]
