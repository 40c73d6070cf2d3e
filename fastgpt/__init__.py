"""fastgpt: fused causal attention, layer norm and RMSNorm for PyTorch (C++, CUDA, Triton),
slotted into the GPT-2 model of "Build a Large Language Model (from Scratch)"."""
from . import _registration  # noqa: F401  (autograd + fake impls of the fastgpt:: ops)
from . import distributed, models, nn
from .models import GPT2_CONFIGS, Gemma3Model, GPTModel, Llama3Model, Qwen3Model
from .patch import patch, unpatch
from .ops import add_rms_norm, attention, info, layer_norm, rms_norm
from .tokenizer import get_tokenizer
from .weights import (load_book_state_dict, load_checkpoint, load_gemma3, load_gpt2, load_llama3, load_pretrained,
                      load_qwen3, save_checkpoint)

__version__ = "0.1.0"

__all__ = ["attention", "layer_norm", "rms_norm", "add_rms_norm", "info", "nn", "models", "distributed", "patch", "unpatch", "GPTModel", "GPT2_CONFIGS", "load_gpt2",
           "load_book_state_dict", "save_checkpoint", "load_checkpoint", "get_tokenizer", "__version__",
           "Llama3Model", "Qwen3Model", "Gemma3Model", "load_pretrained", "load_llama3", "load_qwen3", "load_gemma3"]
