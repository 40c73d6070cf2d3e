"""Triton kernels of the `triton` backend, registered as torch operators; one module per op,
named like the op in every other layer (csrc/cpu/<op>.cpp, csrc/cuda/<op>*, tests/test_<op>.py):

- attention: FlashAttention-2 forward and backward (fastgpt::triton_attention_fwd/_bwd);
- layer_norm: layer norm forward and backward (fastgpt::triton_layer_norm_fwd/_bwd).

Each module's entry point has the module's name: attention.attention, layer_norm.layer_norm
(what fastgpt.backends calls). fastgpt.backends imports this package only where Triton can
run: on a GPU, or on CPU tensors when TRITON_INTERPRET=1 was set before the import (Triton's
interpreter). The operators are torch.library custom ops whose fake impls, autograd and
double-backward guard come from the op contract (fastgpt/_registration.py), shared with the
C++/CUDA operators, so torch.compile(fullgraph=True) traces through them.
"""
from . import attention, layer_norm

__all__ = ["attention", "layer_norm"]
