"""Triton kernels of the `triton` backend, registered as torch operators.

- flash_attention: FlashAttention-2 forward and backward (fastgpt::triton_attention_fwd/_bwd);
- fused_layer_norm: layer norm forward and backward (fastgpt::triton_layer_norm_fwd/_bwd).

fastgpt.backends imports this package only where Triton can run: on a GPU, or on CPU
tensors when TRITON_INTERPRET=1 was set before the import (Triton's interpreter).
The operators are torch.library custom ops with fake and autograd implementations,
so torch.compile(fullgraph=True) traces through them.
"""
from .flash_attention import attention
from .fused_layer_norm import layer_norm

__all__ = ["attention", "layer_norm"]
