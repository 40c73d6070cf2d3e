"""fastgpt: fused causal attention and layer norm for PyTorch (C++, CUDA, Triton),
slotted into the GPT-2 model of "Build a Large Language Model (from Scratch)"."""
from . import _registration  # noqa: F401  (autograd + fake impls of the fastgpt:: ops)
from .ops import attention, info, layer_norm

__version__ = "0.1.0"

__all__ = ["attention", "layer_norm", "info", "__version__"]
