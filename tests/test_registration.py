"""The operator-level contract of fastgpt._C: the fastgpt:: schemas, which dispatch keys have
kernels (CPU always, CUDA on a GPU machine for the ops the registry says the cuda backend has),
and torch.compile(fullgraph=True) tracing the public API through the fake and autograd
registrations. (opcheck of the ops: test_layer_norm.py, test_attention.py, test_rms_norm.py.)"""
import pytest
import torch

import fastgpt
from fastgpt import backends
from checks import assert_close
from conftest import HAS_GPU

SCHEMAS = {
    "attention_fwd": "fastgpt::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
                     "float scale, float dropout_p, int seed, int window, float softcap) -> (Tensor out, Tensor lse)",
    "attention_bwd": "fastgpt::attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                     "Tensor? key_padding_mask, bool causal, float scale, float dropout_p, int seed, int window, "
                     "float softcap, Tensor? grad_lse=None) "
                     "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
    "layer_norm_fwd": "fastgpt::layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) "
                      "-> (Tensor y, Tensor mean, Tensor rstd)",
    "layer_norm_bwd": "fastgpt::layer_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
                      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
    "rms_norm_fwd": "fastgpt::rms_norm_fwd(Tensor x, Tensor? weight, float eps, float offset) -> (Tensor y, Tensor rstd)",
    "add_rms_norm_fwd": "fastgpt::add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps, float offset) "
                        "-> (Tensor y, Tensor sum, Tensor rstd)",
    "rms_norm_bwd": "fastgpt::rms_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, float offset) "
                    "-> (Tensor grad_x, Tensor grad_weight)",
}
OPS = tuple(SCHEMAS)


def public_op(op: str) -> str:
    """The public op an operator implements: rms_norm_bwd -> rms_norm."""
    return op.rsplit("_", 1)[0]


# What the registry says the cuda backend has kernels for: only those must be compiled for CUDA.
CUDA_OPS = tuple(op for op in OPS if backends.REGISTRY["cuda"].lacks(public_op(op)) is None)


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", key)


@pytest.mark.parametrize("op", OPS)
def test_schema_is_registered(op):
    assert str(getattr(torch.ops.fastgpt, op).default._schema) == SCHEMAS[op]


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_and_fake_impl_are_registered(op):
    assert has_kernel(op, "CPU"), f"fastgpt::{op} has no CPU kernel: csrc/cpu was not compiled in"
    assert has_kernel(op, "Meta"), f"fastgpt::{op} has no fake impl (fastgpt/_registration.py)"


@pytest.mark.parametrize("op", ("attention_fwd", "layer_norm_fwd", "rms_norm_fwd", "add_rms_norm_fwd"))
def test_forward_ops_are_differentiable(op):
    assert has_kernel(op, "Autograd"), f"fastgpt::{op} has no autograd registration"


def test_cuda_ops_are_the_cuda_backends_ops():
    assert set(CUDA_OPS) == {"attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd",
                             "add_rms_norm_fwd", "rms_norm_bwd"}


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_are_what_the_registry_declares(op):
    if not HAS_GPU:
        pytest.skip("no GPU in this session")
    # When csrc/cuda gains an op, the registry's `missing` of the cuda backend must lose it.
    assert has_kernel(op, "CUDA") == (op in CUDA_OPS), (
        f"fastgpt::{op}: CUDA kernel registered = {has_kernel(op, 'CUDA')}, but fastgpt/backends.py says "
        f"{backends.REGISTRY['cuda'].lacks(public_op(op))!r}")


@pytest.mark.cuda
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_is_registered_on_a_gpu_machine(op):
    if not HAS_GPU:
        pytest.skip("no GPU in this session")
    # A GPU is here: an extension built without its CUDA kernels is a broken build, not a skip.
    assert has_kernel(op, "CUDA"), (f"fastgpt::{op} has no CUDA kernel although a GPU is visible: rebuild with "
                                    f"the CUDA toolkit (FASTGPT_CUDA=1)")


def test_compile_fullgraph_matches_eager():
    """A pre-norm attention block: layer norm -> q, k, v -> causal attention -> residual,
    compiled in one graph (fullgraph=True) with inductor; output and gradients as in eager."""
    B, T, H, D = 2, 24, 2, 16
    C = 3 * H * D

    def block(x, weight, bias):  # x (B, T, C) -> (B, T, H * D)
        h = fastgpt.layer_norm(x, weight, bias, backend="cpu")  # (B, T, C)
        q, k, v = h.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        out = fastgpt.attention(q, k, v, causal=True, backend="cpu")  # (B, H, T, D)
        return out.transpose(1, 2).reshape(B, T, H * D) + x[..., : H * D]

    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(B, T, C, generator=gen), 1 + 0.1 * torch.randn(C, generator=gen),
              0.1 * torch.randn(C, generator=gen))
    grad_out = torch.randn(B, T, H * D, generator=gen)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True, backend=recording_inductor))
    eager = run(block)
    assert len(graphs) == 1
    code = graphs[0].code
    assert "fastgpt.layer_norm_fwd" in code and "fastgpt.attention_fwd" in code, code
    for name, got, want in zip(("out", "grad_x", "grad_weight", "grad_bias"), compiled, eager):
        assert_close(got, want, what=f"compiled {name}")


def test_compile_fullgraph_rms_norm_block_matches_eager():
    """A pre-norm block the Llama / Gemma way: add_rms_norm (residual add + norm, Gemma's offset) ->
    projection -> rms_norm without weight, compiled in one graph; outputs and gradients as in eager."""
    C = 40

    def block(x, residual, weight, proj):  # x, residual (B, T, C) -> (B, T, C), (B, T, C)
        h, total = fastgpt.add_rms_norm(x, residual, weight, offset=1.0, backend="cpu")
        return fastgpt.rms_norm(h @ proj, None, backend="cpu"), total

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 7, C, generator=gen), torch.randn(2, 7, C, generator=gen),
              0.1 * torch.randn(C, generator=gen), torch.randn(C, C, generator=gen) / C ** 0.5)
    grads = (torch.randn(2, 7, C, generator=gen), torch.randn(2, 7, C, generator=gen))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        return (*outs, *torch.autograd.grad(outs, leaves, grads))

    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True, backend=recording))
    eager = run(block)
    assert len(graphs) == 1
    code = graphs[0].code
    assert "fastgpt.add_rms_norm_fwd" in code and "fastgpt.rms_norm_fwd" in code, code
    for name, got, want in zip(("y", "sum", "grad_x", "grad_residual", "grad_weight", "grad_proj"), compiled, eager):
        assert_close(got, want, what=f"compiled {name}")


def test_double_backward_through_the_fused_ops_raises_clearly():
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_q, = torch.autograd.grad(fastgpt.attention(q, k, v, backend="cpu").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad_q.sum().backward()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grad_x, = torch.autograd.grad(fastgpt.layer_norm(x, None, None, backend="cpu").pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad_x.sum().backward()
