"""fastgpt: fused causal attention and layer norm for PyTorch (C++, CUDA, Triton),
slotted into the GPT-2 model of "Build a Large Language Model (from Scratch)"."""
from . import _registration  # noqa: F401  (autograd + fake impls of the fastgpt:: ops)
from . import models, nn
from .models import GPT2_CONFIGS, GPTModel
from .patch import patch, unpatch
from .ops import attention, info, layer_norm
from .tokenizer import get_tokenizer
from .weights import load_book_state_dict, load_checkpoint, load_gpt2, save_checkpoint

__version__ = "0.1.0"

__all__ = ["attention", "layer_norm", "info", "nn", "models", "patch", "unpatch", "GPTModel", "GPT2_CONFIGS", "load_gpt2",
           "load_book_state_dict", "save_checkpoint", "load_checkpoint", "get_tokenizer", "__version__"]
