"""fastgpt.rms_norm and fastgpt.add_rms_norm on every fused backend (cpu, cuda, triton) against the
float64 oracle fastgpt.reference.rms_norm / add_rms_norm: outputs and gradients in x, weight and
residual over odd shapes, every dtype, offset 0 and 1 (Gemma), weight None, 3-D and non-contiguous
input. Then the public API's contract (torch.nn.RMSNorm equivalence, the registry's `missing` refusal on
a fake backend, input validation), and the C++ ops' own: saved rstd, gradcheck, opcheck, thread-count
independence, argument checks; the Triton ops' opcheck and their sm_90 compile.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgpt
from fastgpt import backends, reference
from checks import GRAD_LAYOUTS, assert_close, grad_in_layout
from conftest import require_backend, skip_unsupported_dtype

EPS = 1e-6
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (rows, C): C = 1, primes, 1500 and 4099 (not multiples of the vector width: tails); 1023 rows.
SHAPES = ((1, 1), (31, 1), (7, 13), (1023, 1500), (3, 4099))
OFFSETS = (0.0, 1.0)
# (rows, C, dtype) with y and grad_x of 16 MiB or more, which the CPU kernels write with
# streaming stores (csrc/cpu/norm_rows.h, kStreamingMinBytes): rows aligned to the vector (C 1024,
# 2048) and rows that mostly are not (C 1025).
LARGE_SHAPES = ((4096, 1024, torch.float32), (4099, 2048, torch.bfloat16), (2048, 1024, torch.float64),
                (4100, 1025, torch.float32))


def make_inputs(shape, dtype, device, offset=0.0, seed=0):
    """x, residual (*shape), weight (C,), grad_y, grad_sum (*shape) in `dtype` on `device`. With
    offset 1 the weight is near 0 (Gemma stores w with the scale 1 + w), else near 1."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.3
    residual = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = (1.0 - offset) + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad_sum = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, residual, weight, grad_y, grad_sum))


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def run_rms_norm(fn, x, weight, grad_y, offset):
    """(y, grad_x[, grad_weight]) of fn(x, weight) = an rms_norm with that offset."""
    inputs = leaves(x) + ([] if weight is None else leaves(weight))
    y = fn(inputs[0], inputs[1] if weight is not None else None, EPS, offset=offset)
    return (y, *torch.autograd.grad(y, inputs, grad_y))


def run_add_rms_norm(fn, x, residual, weight, grad_y, grad_sum, offset):
    """(y, sum, grad_x, grad_residual[, grad_weight]), the gradients of <y, grad_y> + <sum, grad_sum>."""
    inputs = leaves(x, residual) + ([] if weight is None else leaves(weight))
    y, total = fn(inputs[0], inputs[1], inputs[2] if weight is not None else None, EPS, offset=offset)
    return (y, total, *torch.autograd.grad((y, total), inputs, (grad_y, grad_sum)))


def compare(got, x, run, names):
    """Every result has x's dtype and is within tolerance of the float64 oracle."""
    oracle = run(torch.float64)
    same = run(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else oracle
    for name, g, o, s in zip(names, got, oracle, same):
        assert g.dtype == x.dtype and g.device == x.device, f"{name}: {g.dtype} on {g.device}"
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(o.shape)}"
        assert_close(g, o.to(g.device), s.to(g.device), what=name)


def check_rms_norm(backend, x, weight, grad_y, offset):
    got = run_rms_norm(lambda *a, **k: fastgpt.rms_norm(*a, **k, backend=backend), x, weight, grad_y, offset)

    def run(dtype):
        return run_rms_norm(reference.rms_norm, x.to(dtype), None if weight is None
                            else weight.to(dtype), grad_y.to(dtype), offset)
    compare(got, x, run, [f"{backend} {n}" for n in ("y", "grad_x", "grad_weight")])


def check_add_rms_norm(backend, x, residual, weight, grad_y, grad_sum, offset):
    got = run_add_rms_norm(lambda *a, **k: fastgpt.add_rms_norm(*a, **k, backend=backend), x, residual, weight,
                           grad_y, grad_sum, offset)

    def run(dtype):
        return run_add_rms_norm(reference.add_rms_norm, x.to(dtype), residual.to(dtype),
                                None if weight is None else weight.to(dtype), grad_y.to(dtype), grad_sum.to(dtype),
                                offset)
    compare(got, x, run, [f"{backend} {n}" for n in ("y", "sum", "grad_x", "grad_residual", "grad_weight")])


# ---- every fused backend against the oracle -------------------------------------------------

@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_oracle(kernel, shape, dtype, offset):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    x, _, weight, grad_y, _ = make_inputs(shape, dtype, device, offset)
    check_rms_norm(backend, x, weight, grad_y, offset)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm_matches_oracle(kernel, shape, dtype, offset):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    x, residual, weight, grad_y, grad_sum = make_inputs(shape, dtype, device, offset)
    check_add_rms_norm(backend, x, residual, weight, grad_y, grad_sum, offset)


@pytest.mark.parametrize("rows, C, dtype", LARGE_SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_large_cpu_outputs_match_oracle(rows, C, dtype):
    x, residual, weight, grad_y, grad_sum = make_inputs((rows, C), dtype, require_backend("cpu"))
    check_rms_norm("cpu", x, weight, grad_y, 0.0)
    check_add_rms_norm("cpu", x, residual, weight, grad_y, grad_sum, 0.0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("offset", OFFSETS)
def test_weight_none(kernel, dtype, offset):
    """No weight: y = x · rstd whatever the offset (the identity scale of both conventions)."""
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    x, residual, _, grad_y, grad_sum = make_inputs((17, 768), dtype, device)
    check_rms_norm(backend, x, None, grad_y, offset)
    check_add_rms_norm(backend, x, residual, None, grad_y, grad_sum, offset)
    y = fastgpt.rms_norm(x, None, EPS, offset=offset, backend=backend)
    assert_close(y, fastgpt.rms_norm(x.double(), torch.ones(768, dtype=torch.float64, device=device), EPS,
                                     backend="naive"), reference.rms_norm(x, None, EPS), what="y without weight")


def test_three_dim_input(kernel):
    backend, device = kernel
    x, residual, weight, grad_y, grad_sum = make_inputs((3, 5, 64), torch.float32, device, seed=2)
    check_rms_norm(backend, x, weight, grad_y, 0.0)
    check_add_rms_norm(backend, x, residual, weight, grad_y, grad_sum, 1.0)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_upstream_gradient_layouts(kernel, dtype, layout):
    """grad_y (and add_rms_norm's grad of the sum) as autograd hands them over: an expanded
    scalar (y.sum().backward()), an expanded row, a row stride past C, column-major."""
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    x, residual, weight, grad_y, grad_sum = make_inputs((257, 771), dtype, device)
    check_rms_norm(backend, x, weight, grad_in_layout(grad_y, layout), 1.0)
    check_rms_norm(backend, x, None, grad_in_layout(grad_y, layout), 0.0)
    check_add_rms_norm(backend, x, residual, weight, grad_in_layout(grad_y, layout),
                       grad_in_layout(grad_sum, layout), 0.0)


def test_non_contiguous_input(kernel):
    """Rows with a stride past C, a strided weight and grad_y, and a transposed 3-D x."""
    backend, device = kernel
    wide, wide_residual, weight, grad_y, grad_sum = make_inputs((33, 2 * 96), torch.float32, device)
    x, residual, weight = wide[:, :96], wide_residual[:, 1::2], weight[::2]
    grad_y = grad_y.t().contiguous().t()[:, 1::2]
    assert not (x.is_contiguous() or residual.is_contiguous() or weight.is_contiguous() or grad_y.is_contiguous())
    check_rms_norm(backend, x, weight, grad_y, 1.0)
    check_add_rms_norm(backend, x, residual, weight, grad_y, grad_sum[:, :96], 0.0)
    x3, residual3, weight3, grad_y3, grad_sum3 = make_inputs((9, 4, 80), torch.float32, device, seed=1)
    check_rms_norm(backend, x3.transpose(0, 1), weight3, grad_y3.transpose(0, 1), 0.0)
    check_add_rms_norm(backend, x3.transpose(0, 1), residual3.transpose(0, 1), weight3, grad_y3.transpose(0, 1),
                       grad_sum3.transpose(0, 1), 0.0)


def test_sum_is_rounded_before_it_is_normalised(kernel):
    """x + residual is rounded to x's dtype first (the unfused code's h), then normalised: y is the
    backend's own rms_norm of the returned sum, to the bit where one launch config runs both (CPU)."""
    backend, device = kernel
    dtype = torch.float16 if (backend, device) == ("triton", "cpu") else torch.bfloat16  # interpreter: no bf16
    x, residual, weight, _, _ = make_inputs((64, 520), dtype, device)
    y, total = fastgpt.add_rms_norm(x, residual, weight, EPS, backend=backend)
    assert torch.equal(total, x + residual)
    unfused = fastgpt.rms_norm(total, weight, EPS, backend=backend)
    if device == "cpu":
        assert torch.equal(y, unfused)
    else:  # GPU autotuning may pick other tiles for the two kernels: the same to rounding
        assert_close(y, reference.rms_norm(total.double(), weight.double(), EPS), unfused)


# ---- the public API --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("naive", "sdpa", "cpu"))
def test_torch_rms_norm_modules_are_expressible(backend):
    """torch.nn.RMSNorm with and without elementwise_affine, and Gemma's (1 + w) at offset 1."""
    require_backend(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 48, generator=gen)
    affine = torch.nn.RMSNorm(48, eps=EPS)
    with torch.no_grad():
        affine.weight.copy_(1 + 0.3 * torch.randn(48, generator=gen))
    plain = torch.nn.RMSNorm(48, eps=EPS, elementwise_affine=False)
    with torch.no_grad():
        torch.testing.assert_close(fastgpt.rms_norm(x, affine.weight, EPS, backend=backend), affine(x))
        torch.testing.assert_close(fastgpt.rms_norm(x, None, EPS, backend=backend), plain(x))
        torch.testing.assert_close(fastgpt.rms_norm(x, affine.weight - 1, EPS, offset=1.0, backend=backend),
                                   affine(x))


def test_empty_rows_keep_their_shape():
    for backend in ("naive", "cpu"):
        y, total = fastgpt.add_rms_norm(torch.randn(0, 3, 8), torch.randn(0, 3, 8), torch.ones(8), backend=backend)
        assert y.shape == total.shape == (0, 3, 8)
        assert fastgpt.rms_norm(torch.randn(2, 0, 8), None, backend=backend).shape == (2, 0, 8)


def test_weight_is_cast_to_the_dtype_of_x():
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    weight = torch.rand(32, requires_grad=True)  # float32, as under autocast
    y = fastgpt.rms_norm(x, weight, backend="cpu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_registry_says_every_backend_has_rms_norm_kernels():
    for op in ("rms_norm", "add_rms_norm"):
        for name in ("naive", "sdpa", "cpu", "cuda", "triton"):
            assert backends.REGISTRY[name].lacks(op) is None, name
        assert op in fastgpt.info()["cuda"]["ops"] and op not in fastgpt.info()["cuda"]["missing_ops"]
    assert backends.REGISTRY["cuda"].rms_norm is backends._extension_rms_norm
    assert backends.REGISTRY["cuda"].add_rms_norm is backends._extension_add_rms_norm


LACKS_RMS_NORM = {op: f"the fake-cuda backend has no {op} kernel (test): backend='triton' or 'sdpa' runs it"
                  for op in ("rms_norm", "add_rms_norm")}


def test_a_backend_declared_missing_an_op_is_refused_for_it():
    """The registry's `missing` mechanism, on a fake CUDA backend that lacks the RMSNorm kernels."""
    with_cuda = backends.Backend("fake-cuda", "test", backends.FLOAT_DTYPES, None, {"cuda": None},
                                 layer_norm=lambda *a: None, missing=dict(LACKS_RMS_NORM))
    backends.REGISTRY["fake-cuda"] = with_cuda
    try:
        for op in ("rms_norm", "add_rms_norm"):
            assert with_cuda.lacks(op) == LACKS_RMS_NORM[op]
        why = backends.refusal("fake-cuda", "rms_norm", torch.device("cuda"), torch.float32)
        assert why == LACKS_RMS_NORM["rms_norm"] and "backend='triton' or 'sdpa'" in why
        with pytest.raises(NotImplementedError, match=r"fastgpt.rms_norm: backend='fake-cuda' cannot run this call: "
                                                      r"the fake-cuda backend has no rms_norm kernel"):
            backends.select("fake-cuda", torch.device("cuda"), torch.float32, op="rms_norm")
        assert backends.refusal("fake-cuda", "layer_norm", torch.device("cuda"), torch.float32) is None
    finally:
        del backends.REGISTRY["fake-cuda"]


def test_auto_on_cuda_tensors_picks_the_cuda_backend_unless_it_lacks_the_op(monkeypatch):
    """As if the CUDA kernels and Triton ran here: auto picks cuda for every norm; a cuda backend
    declared missing the RMSNorm kernels is passed over for triton, and refused when asked for."""
    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends.REGISTRY[name].unavailable, "cuda", None)
    monkeypatch.setattr(backends.REGISTRY["triton"], "rms_norm", backends.REGISTRY["triton"].rms_norm or (lambda *a: None))
    cuda = torch.device("cuda")
    for op in ("rms_norm", "add_rms_norm", "layer_norm"):
        assert backends.select("auto", cuda, torch.bfloat16, op=op).name == "cuda", op
    assert backends.select("cuda", cuda, torch.bfloat16, op="add_rms_norm").name == "cuda"
    monkeypatch.setattr(backends.REGISTRY["cuda"], "missing", dict(LACKS_RMS_NORM))
    assert backends.select("auto", cuda, torch.bfloat16, op="rms_norm").name == "triton"
    assert backends.select("auto", cuda, torch.bfloat16, op="layer_norm").name == "cuda"
    with pytest.raises(NotImplementedError, match="the fake-cuda backend has no add_rms_norm kernel"):
        backends.select("cuda", cuda, torch.bfloat16, op="add_rms_norm")


def test_explicit_cuda_on_cpu_tensors_says_unavailable():
    with pytest.raises(RuntimeError, match=r"fastgpt.rms_norm: backend='cuda' cannot run this call: unavailable on cpu"):
        fastgpt.rms_norm(torch.randn(3, 8), None, backend="cuda")


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.randn(4, 8), torch.ones(7)), {}, r"fastgpt.rms_norm: weight must have shape \(C,\) = \(8,\) to match x "
                                             r"\(4, 8\), got \(7,\)"),
    ((torch.randn(4, 0), None), {}, r"fastgpt.rms_norm: x must have a non-empty last dim \(\.\.\., C\), got shape \(4, 0\)"),
    ((torch.tensor(1.0), None), {}, r"x must have a non-empty last dim"),
    ((torch.ones(4, 8, dtype=torch.int64), None), {}, r"fastgpt.rms_norm: x must be float16, bfloat16, float32 or float64 "
                                                      r".*, got torch.int64"),
    ((torch.randn(4, 8), torch.ones(8, dtype=torch.int64)), {}, r"weight must be floating point, got torch.int64"),
    ((torch.randn(4, 8), torch.ones(8, device="meta")), {}, r"weight must be on cpu \(the device of x\), got meta"),
    (([1.0], None), {}, r"fastgpt.rms_norm: x must be a torch.Tensor, got list"),
    ((torch.randn(4, 8), "w"), {}, r"weight must be a tensor or None, got str"),
    ((torch.randn(4, 8), None, 0.0), {}, r"fastgpt.rms_norm: eps must be a positive finite number, got 0.0"),
    ((torch.randn(4, 8), None, float("nan")), {}, r"eps must be a positive finite number, got nan"),
    ((torch.randn(4, 8), None, -1e-6), {}, r"eps must be a positive finite number"),
    ((torch.randn(4, 8), None), {"offset": float("inf")}, r"fastgpt.rms_norm: offset must be a finite number .*, got inf"),
    ((torch.randn(4, 8), None), {"offset": "1"}, r"offset must be a finite number .*, got '1'"),
    ((torch.randn(4, 8), None), {"backend": "flash"}, r"unknown backend 'flash'"),
])
def test_rms_norm_rejects_bad_input(args, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fastgpt.rms_norm(*args, **kwargs)


@pytest.mark.parametrize("residual, message", [
    (torch.randn(4, 9), r"fastgpt.add_rms_norm: residual must have the shape, dtype and device of x "
                        r"\(\(4, 8\), torch.float32, cpu\), got \(4, 9\), torch.float32, cpu"),
    (torch.randn(4, 8, dtype=torch.float64), r"residual must have the shape, dtype and device of x .* got \(4, 8\), "
                                             r"torch.float64"),
    (torch.randn(4, 8, device="meta"), r"residual must have the shape, dtype and device of x .*, meta"),
    (None, r"fastgpt.add_rms_norm: residual must be a torch.Tensor, got NoneType"),
])
def test_add_rms_norm_rejects_a_bad_residual(residual, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fastgpt.add_rms_norm(torch.randn(4, 8), residual, None, backend="cpu")


def test_add_rms_norm_checks_x_and_eps_like_rms_norm():
    with pytest.raises(ValueError, match=r"fastgpt.add_rms_norm: eps must be a positive finite number"):
        fastgpt.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8), None, eps=float("inf"))
    with pytest.raises(ValueError, match=r"fastgpt.add_rms_norm: weight must have shape \(C,\) = \(8,\)"):
        fastgpt.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2, 4))


def test_reference_is_the_books_rms_norm():
    """reference.rms_norm is torch.nn.functional.rms_norm (float64), with Gemma's offset on top."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 33, generator=gen, dtype=torch.float64), torch.randn(33, generator=gen, dtype=torch.float64)
    F = torch.nn.functional
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-5), F.rms_norm(x, (33,), w, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-5, offset=1.0), F.rms_norm(x, (33,), 1 + w, 1e-5))
    torch.testing.assert_close(reference.rms_norm(x, None, 1e-5), F.rms_norm(x, (33,), None, 1e-5))
    half = reference.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)  # statistics in float32, one rounding
    torch.testing.assert_close(half, reference.rms_norm(x.bfloat16().float(), w.bfloat16().float(), 1e-5).bfloat16())


# ---- the C++ ops themselves (cpu backend) ----------------------------------------------------

def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_rstd_is_the_float64_one(dtype):
    x, residual, weight, _, _ = make_inputs((65, 770), dtype, "cpu")
    _, rstd = torch.ops.fastgpt.rms_norm_fwd(x, weight, EPS, 0.0)
    _, total, add_rstd = torch.ops.fastgpt.add_rms_norm_fwd(x, residual, weight, EPS, 1.0)
    for r, source in ((rstd, x), (add_rstd, total)):
        assert r.shape == (65,) and r.dtype == stats_dtype(dtype)
        assert_close(r, (source.double().pow(2).mean(-1) + EPS).rsqrt(), what="rstd")


def test_gradcheck_float64():
    x, residual, weight, _, _ = make_inputs((6, 11), torch.float64, "cpu", offset=1.0)
    x, residual, weight = leaves(x, residual, weight)
    for offset in OFFSETS:
        assert torch.autograd.gradcheck(lambda *a: fastgpt.rms_norm(*a, EPS, offset=offset, backend="cpu"), (x, weight))
        assert torch.autograd.gradcheck(lambda a: fastgpt.rms_norm(a, None, EPS, offset=offset, backend="cpu"), (x,))
        assert torch.autograd.gradcheck(lambda *a: fastgpt.add_rms_norm(*a, EPS, offset=offset, backend="cpu"),
                                        (x, residual, weight))


@pytest.mark.parametrize("with_weight", (True, False), ids=("weight", "no-weight"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_opcheck(dtype, with_weight):
    x, residual, weight, grad_y, _ = make_inputs((9, 40), dtype, "cpu")
    x, residual, weight = leaves(x, residual, weight)
    weight = weight if with_weight else None
    torch.library.opcheck(torch.ops.fastgpt.rms_norm_fwd.default, (x, weight, EPS, 1.0))
    torch.library.opcheck(torch.ops.fastgpt.add_rms_norm_fwd.default, (x, residual, weight, EPS, 0.0))
    w = None if weight is None else weight.detach()
    _, rstd = torch.ops.fastgpt.rms_norm_fwd(x.detach(), w, EPS, 1.0)
    torch.library.opcheck(torch.ops.fastgpt.rms_norm_bwd.default, (grad_y, x.detach(), w, rstd, 1.0))


def test_gradients_do_not_depend_on_the_thread_count():
    """grad_weight sums fixed row chunks in a fixed order: bitwise the same on 1 or 2 threads."""
    x, _, weight, grad_y, _ = make_inputs((1000, 96), torch.float32, "cpu")
    _, rstd = torch.ops.fastgpt.rms_norm_fwd(x, weight, EPS, 0.0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastgpt.rms_norm_bwd(grad_y, x, weight, rstd, 0.0))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_backward_without_weight_returns_an_empty_grad_weight():
    x, _, _, grad_y, _ = make_inputs((5, 12), torch.float32, "cpu")
    _, rstd = torch.ops.fastgpt.rms_norm_fwd(x, None, EPS, 0.0)
    grad_x, grad_weight = torch.ops.fastgpt.rms_norm_bwd(grad_y, x, None, rstd, 0.0)
    assert grad_x.shape == (5, 12) and grad_weight.shape == (0,)


@pytest.mark.parametrize("call, message", [
    (lambda x, r, w: torch.ops.fastgpt.rms_norm_fwd(x[None], w, EPS, 0.0),
     r"fastgpt::rms_norm_fwd: x must be 2-D \(N, C\) with C >= 1, got \[1, 4, 8\]"),
    (lambda x, r, w: torch.ops.fastgpt.rms_norm_fwd(x, w[:-1], EPS, 0.0),
     r"fastgpt::rms_norm_fwd: weight must have shape \(C,\) = \(8,\), got \[7\]"),
    (lambda x, r, w: torch.ops.fastgpt.rms_norm_fwd(x, w.double(), EPS, 0.0),
     r"fastgpt::rms_norm_fwd: weight must be Float \(the dtype of x\), got Double"),
    (lambda x, r, w: torch.ops.fastgpt.rms_norm_fwd(x, w, 0.0, 0.0),
     r"fastgpt::rms_norm_fwd: eps must be positive and finite, got 0"),
    (lambda x, r, w: torch.ops.fastgpt.rms_norm_fwd(x, w, EPS, float("nan")),
     r"fastgpt::rms_norm_fwd: offset must be finite, got nan"),
    (lambda x, r, w: torch.ops.fastgpt.add_rms_norm_fwd(x, r[:3], w, EPS, 0.0),
     r"fastgpt::add_rms_norm_fwd: residual must have the shape, dtype and device of x \(\[4, 8\], Float, cpu\), "
     r"got \[3, 8\], Float, cpu"),
    (lambda x, r, w: torch.ops.fastgpt.add_rms_norm_fwd(x, r.half(), None, EPS, 0.0),
     r"fastgpt::add_rms_norm_fwd: residual must have the shape, dtype and device of x .*got \[4, 8\], Half"),
])
def test_forward_ops_check_their_arguments(call, message):
    x, residual, weight, _, _ = make_inputs((4, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=message):
        call(x, residual, weight)


def test_backward_op_checks_its_arguments():
    x, _, weight, grad_y, _ = make_inputs((4, 8), torch.float32, "cpu")
    _, rstd = torch.ops.fastgpt.rms_norm_fwd(x, weight, EPS, 0.0)
    with pytest.raises(RuntimeError, match=r"fastgpt::rms_norm_bwd: grad_y must have the shape, dtype and device of x"):
        torch.ops.fastgpt.rms_norm_bwd(grad_y[:3], x, weight, rstd, 0.0)
    with pytest.raises(RuntimeError, match=r"fastgpt::rms_norm_bwd: rstd must be \(N,\) = \(4,\) in Float on cpu, "
                                           r"got \[4\] Double"):
        torch.ops.fastgpt.rms_norm_bwd(grad_y, x, weight, rstd.double(), 0.0)


def test_double_backward_raises_clearly():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu",) + (("triton",) if "cpu" in fastgpt.info()["triton"]["devices"] else ()):
        dtype = torch.float64 if backend == "cpu" else torch.float32
        xs = x.detach().to(dtype).requires_grad_()
        grad_x, = torch.autograd.grad(fastgpt.rms_norm(xs, None, backend=backend).pow(2).sum(), xs, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward .* is not supported"):
            grad_x.sum().backward()
        y, total = fastgpt.add_rms_norm(xs, xs * 2, None, backend=backend)
        grad_x, = torch.autograd.grad(y.pow(2).sum() + total.sum(), xs, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward .* is not supported"):
            grad_x.sum().backward()


# ---- the Triton ops --------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("with_weight", (True, False), ids=("weight", "no-weight"))
def test_triton_opcheck(with_weight):
    device = require_backend("triton")
    from fastgpt.triton import rms_norm as triton_rms_norm
    x, residual, weight, grad_y, _ = make_inputs((9, 40), torch.float32, device)
    x, residual, weight = leaves(x, residual, weight)
    weight = weight if with_weight else None
    torch.library.opcheck(triton_rms_norm.rms_norm_fwd, (x, weight, EPS, 1.0))
    torch.library.opcheck(triton_rms_norm.add_rms_norm_fwd, (x, residual, weight, EPS, 0.0))
    w = None if weight is None else weight.detach()
    _, rstd = triton_rms_norm.rms_norm_fwd(x.detach(), w, EPS, 1.0)
    torch.library.opcheck(triton_rms_norm.rms_norm_bwd, (grad_y, x.detach(), w, rstd, 1.0))


@pytest.mark.triton
def test_triton_weight_grads_with_a_short_last_group():
    """The backward's row groups: N leaves the last one shorter than the others."""
    device = require_backend("triton")
    from fastgpt.triton import layer_norm as triton_layer_norm
    N = 4 * 37 + 5
    rows_per_group, num_groups = triton_layer_norm.row_groups(N, torch.device(device))
    assert num_groups > 1 and N % rows_per_group != 0
    x, residual, weight, grad_y, grad_sum = make_inputs((N, 100), torch.float32, device, offset=1.0)
    check_rms_norm("triton", x, weight, grad_y, 1.0)
    check_add_rms_norm("triton", x, residual, weight, grad_y, grad_sum, 1.0)


@pytest.mark.triton
def test_triton_ops_check_their_own_preconditions():
    device = require_backend("triton")
    from fastgpt.triton import rms_norm as triton_rms_norm
    x = torch.randn(4, 16, device=device)
    with pytest.raises(RuntimeError, match=r"fastgpt::triton_rms_norm_bwd: rstd must be contiguous float32 "
                                           r"\(N,\) = \(4,\), got torch.float64"):
        triton_rms_norm.rms_norm_bwd(x, x, None, torch.ones(4, dtype=torch.float64, device=device), 0.0)
    with pytest.raises(RuntimeError, match=r"fastgpt::triton_add_rms_norm_fwd: residual must have the shape of x"):
        triton_rms_norm.add_rms_norm_fwd(x, x[:3], None, EPS, 0.0)
    with pytest.raises(RuntimeError, match=r"fastgpt::triton_rms_norm_fwd: C must be at most 65536"):
        triton_rms_norm.rms_norm_fwd(torch.randn(1, 65537, device=device), None, EPS, 0.0)


@pytest.mark.triton
def test_triton_ops_trace_fullgraph():
    """torch.compile(fullgraph=True) through the Triton ops' fake impls and autograd (aot_eager: the
    tracing is what is tested); outputs and gradients as in eager."""
    device = require_backend("triton")

    def block(x, residual, weight):  # (B, T, C), (B, T, C), (C,)
        h, total = fastgpt.add_rms_norm(x, residual, weight, offset=1.0, backend="triton")
        return fastgpt.rms_norm(h, None, backend="triton") + total

    x, residual, weight, grad_y, _ = make_inputs((2, 9, 48), torch.float32, device, offset=1.0)
    torch._dynamo.reset()
    results = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        inputs = leaves(x, residual, weight)
        out = fn(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad_y)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


HOPPER_COMPILE_SCRIPT = textwrap.dedent("""
    # Compiles the RMSNorm kernels for sm_90 with Triton's own compiler: no GPU needed.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from fastgpt.triton import rms_norm as rn

    UNIT_STRIDES = ("stride_xc", "stride_rc", "stride_dyc", "stride_w")  # specialised to 1 at a launch
    FLOATS = ("eps", "offset")
    FLOAT32_POINTERS = ("rstd_ptr", "dw_partial_ptr")

    def build(kernel, dtype, constexprs):
        config = kernel.configs[0]
        fn = kernel.fn
        constexprs = {**constexprs, **config.kwargs, **{name: 1 for name in UNIT_STRIDES if name in fn.arg_names}}
        signature = {name: "constexpr" if name in constexprs else
                     ("*fp32" if name in FLOAT32_POINTERS else "*" + dtype) if name.endswith("_ptr") else
                     "fp32" if name in FLOATS else "i32" for name in fn.arg_names}
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        compiled = compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], fn.__name__

    for has_weight in (True, False):
        build(rn._rms_norm_fwd_kernel, "bf16", dict(BLOCK_C=4096, HAS_RESIDUAL=True, HAS_WEIGHT=has_weight))
        build(rn._rms_norm_fwd_kernel, "fp16", dict(BLOCK_C=1024, HAS_RESIDUAL=False, HAS_WEIGHT=has_weight))
        build(rn._rms_norm_bwd_kernel, "bf16", dict(BLOCK_C=1024, HAS_WEIGHT=has_weight))
    print("compiled")
""")


@pytest.mark.triton
def test_triton_kernels_compile_for_hopper():
    # bfloat16 and the real compiler: in a process without TRITON_INTERPRET (see test_triton.py).
    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout + result.stderr
