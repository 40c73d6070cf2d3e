"""fastgpt.layer_norm on every fused backend (cpu, cuda, triton) against the float64 oracle
fastgpt.reference.layer_norm: output and gradients in x, weight and bias over odd shapes, every
dtype, 3-D and non-contiguous input, a large mean offset, weight/bias None. Then the C++ op's own
contract: saved statistics, gradcheck, opcheck, thread-count independence, its argument checks.
"""
import pytest
import torch

import fastgpt
from fastgpt import reference
from checks import GRAD_LAYOUTS, assert_close, grad_in_layout
from conftest import require_backend, skip_unsupported_dtype

EPS = 1e-5
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (rows, C): rows 1, 7, 1023, 1500 and C 1, 7, 64, 768, 1600, 4099 (not a power of two: vector tails).
SHAPES = ((1, 1), (7, 7), (1023, 64), (1500, 768), (7, 1600), (2, 4099))
# (rows, C, dtype) with y and grad_x of 16 MiB or more, which the CPU kernels write with streaming
# stores (csrc/cpu/norm_rows.h, kStreamingMinBytes): rows aligned to the vector (C 1024, 2048) and
# rows that mostly are not (C 1025: only every 16th float32 row starts on a 64-byte boundary).
LARGE_SHAPES = ((4096, 1024, torch.float32), (4099, 2048, torch.bfloat16), (2048, 1024, torch.float64),
                (4100, 1025, torch.float32))


def make_inputs(shape, dtype, device, offset=0.0, seed=0):
    """x (*shape), weight, bias (C,), grad_y (*shape) in `dtype` on `device`."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) + offset
    weight = 1 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias, grad_y))


def reference_run(x, weight, bias, grad_y, dtype):
    """(y, grad_x, grad_weight, grad_bias) of the book's layer norm computed in `dtype`."""
    xs, ws, bs = (t.detach().to(dtype).requires_grad_() for t in (x, weight, bias))
    y = reference.layer_norm(xs, ws, bs, EPS)
    return (y, *torch.autograd.grad(y, (xs, ws, bs), grad_y.to(dtype)))


def check_against_oracle(backend, x, weight, bias, grad_y, affine=True):
    """Runs fastgpt.layer_norm and its backward on `backend`; compares with the float64 oracle."""
    xg = x.detach().requires_grad_()
    params = (weight.detach().requires_grad_(), bias.detach().requires_grad_()) if affine else (None, None)
    y = fastgpt.layer_norm(xg, *params, EPS, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    inputs = (xg, *params) if affine else (xg,)
    got = (y, *torch.autograd.grad(y, inputs, grad_y))
    if not affine:  # the oracle's parameters: ones and zeros
        weight, bias = torch.ones_like(weight), torch.zeros_like(bias)
    oracle = reference_run(x, weight, bias, grad_y, torch.float64)
    same = reference_run(x, weight, bias, grad_y, x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else oracle
    for name, g, o, s in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, oracle, same):
        assert g.dtype == x.dtype, f"{name} has dtype {g.dtype}, x has {x.dtype}"
        assert_close(g, o, s, what=f"{backend} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(kernel, shape, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    check_against_oracle(backend, *make_inputs(shape, dtype, device))


@pytest.mark.parametrize("rows, C, dtype", LARGE_SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_large_cpu_outputs_match_oracle(rows, C, dtype):
    check_against_oracle("cpu", *make_inputs((rows, C), dtype, require_backend("cpu")))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("shape", ((257, 768), (3, 4099)), ids=lambda s: "x".join(map(str, s)))
def test_large_mean_offset(kernel, shape, dtype):
    """x = 1e3 + randn: E[x²] - E[x]² would cancel to noise in float32; the variance must not."""
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    check_against_oracle(backend, *make_inputs(shape, dtype, device, offset=1e3))


def test_three_dim_input(kernel):
    backend, device = kernel
    check_against_oracle(backend, *make_inputs((3, 5, 64), torch.float32, device))


def test_non_contiguous_input(kernel):
    """Rows with a stride past C, a strided weight and grad_y, and a transposed 3-D x."""
    backend, device = kernel
    wide, weight, bias, grad_y = make_inputs((33, 2 * 96), torch.float32, device)
    x, weight, grad_y = wide[:, :96], weight[::2], grad_y.t().contiguous().t()[:, 1::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or grad_y.is_contiguous())
    check_against_oracle(backend, x, weight, bias[:96], grad_y)
    x3, weight3, bias3, grad_y3 = make_inputs((9, 4, 80), torch.float32, device, seed=1)
    check_against_oracle(backend, x3.transpose(0, 1), weight3, bias3, grad_y3.transpose(0, 1))


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_upstream_gradient_layouts(kernel, dtype, layout):
    """grad_y as autograd hands it over: an expanded scalar (y.sum().backward()), an expanded
    row, a row stride past C, column-major; read in place where the kernel can."""
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    x, weight, bias, grad_y = make_inputs((257, 771), dtype, device)
    check_against_oracle(backend, x, weight, bias, grad_in_layout(grad_y, layout))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_weight_and_bias_none(kernel, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    check_against_oracle(backend, *make_inputs((17, 768), dtype, device), affine=False)


# ---- the C++ op itself (cpu backend) --------------------------------------------------------

def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", (0.0, 1e3))
def test_saved_statistics_are_the_float64_ones(dtype, offset):
    x, weight, bias, _ = make_inputs((65, 770), dtype, "cpu", offset=offset)
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, EPS)
    assert mean.shape == rstd.shape == (65,) and mean.dtype == rstd.dtype == stats_dtype(dtype)
    x64 = x.double()
    assert_close(mean, x64.mean(-1), what="mean")
    assert_close(rstd, (x64.var(-1, unbiased=False) + EPS).rsqrt(), what="rstd")


def test_backward_corrects_an_inexact_saved_mean():
    """The backward takes mean - mean_saved from x again, so a saved mean off by 1e-3 (the
    rounding of a float32 mean near 1e4) leaves the gradients at float32 accuracy."""
    x, weight, bias, grad_y = make_inputs((257, 768), torch.float32, "cpu", offset=1e3)
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, EPS)
    got = torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean + 1e-3, rstd)
    oracle = reference_run(x, weight, bias, grad_y, torch.float64)[1:]
    for name, g, o in zip(("grad_x", "grad_weight", "grad_bias"), got, oracle):
        assert_close(g, o, what=name)


def test_gradcheck_float64():
    x, weight, bias, _ = make_inputs((6, 11), torch.float64, "cpu")
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: fastgpt.layer_norm(*a, EPS, backend="cpu"), (x, weight, bias))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_opcheck(dtype):
    x, weight, bias, grad_y = make_inputs((9, 40), dtype, "cpu")
    fwd_args = [t.requires_grad_() for t in (x, weight, bias)] + [EPS]
    torch.library.opcheck(torch.ops.fastgpt.layer_norm_fwd.default, fwd_args)
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x.detach(), weight.detach(), bias.detach(), EPS)
    bwd_args = (grad_y, x.detach(), weight.detach(), mean, rstd)
    torch.library.opcheck(torch.ops.fastgpt.layer_norm_bwd.default, bwd_args)


def test_gradients_do_not_depend_on_the_thread_count():
    """grad_weight / grad_bias sum fixed row chunks in a fixed order: bitwise the same on 1 or 2 threads."""
    x, weight, bias, grad_y = make_inputs((1000, 96), torch.float32, "cpu")
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, EPS)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean, rstd))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("args, message", [
    (lambda x, w, b: (x[None], w, b), r"fastgpt::layer_norm_fwd: x must be 2-D \(N, C\) with C >= 1, got \[1, 4, 8\]"),
    (lambda x, w, b: (x, w[:-1], b), r"fastgpt::layer_norm_fwd: weight must have shape \(C,\) = \(8,\), got \[7\]"),
    (lambda x, w, b: (x, w, b.double()), r"fastgpt::layer_norm_fwd: bias must be Float \(the dtype of x\), got Double"),
])
def test_forward_op_checks_its_arguments(args, message):
    x, weight, bias, _ = make_inputs((4, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.layer_norm_fwd(*args(x, weight, bias), EPS)


def test_backward_op_checks_its_arguments():
    x, weight, bias, grad_y = make_inputs((4, 8), torch.float32, "cpu")
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, EPS)
    with pytest.raises(RuntimeError, match=r"fastgpt::layer_norm_bwd: grad_y must have the shape, dtype and device of x"):
        torch.ops.fastgpt.layer_norm_bwd(grad_y[:3], x, weight, mean, rstd)
    with pytest.raises(RuntimeError, match=r"fastgpt::layer_norm_bwd: rstd must be \(N,\) = \(4,\) in Float on cpu, got \[4\] Double"):
        torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean, rstd.double())
