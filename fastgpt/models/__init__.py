"""The models of fastgpt, built on fastgpt.nn's fused modules: gpt2 (the book's GPT-2).
Llama 3, Qwen 3 and Gemma 3 come next, one module each beside gpt2.py.

Named configs (one registry for the library, the train and generate commands and the
benchmarks) are in `configs`: model_config("tiny"), GPT2_CONFIGS["gpt2-small"], ...
"""
from . import configs, gpt2
from .configs import CONFIG_NAMES, CONFIGS, GPT2_CONFIGS, LAPTOP_CONFIGS, check_config, model_config
from .gpt2 import GPTModel

__all__ = ["configs", "gpt2", "GPTModel", "GPT2_CONFIGS", "LAPTOP_CONFIGS", "CONFIGS", "CONFIG_NAMES",
           "check_config", "model_config"]
