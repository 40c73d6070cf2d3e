"""The fused attention kernels (cpu, cuda, triton) against the float64 oracle (fastgpt/reference.py).

Every backend runs the same tests through the public API, `fastgpt.attention(..., backend=...)`,
via the `kernel` fixture of conftest.py; the op-level `torch.ops.fastgpt.*` calls are cpu-only.
Shapes stay small (Triton runs these under its slow CPU interpreter): T from 1 to 333, mostly odd
or prime so that partial tiles are always exercised, head dims 16..256 (80 and 96 too: the GPU
backends pad them; any 1..256 on cpu).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastgpt
from fastgpt import backends, reference
from fastgpt.ops import _draw_seed
from checks import assert_close, attention_oracle, make_qkv, padding_mask
from conftest import require_backend, skip_unsupported_dtype

# B, H, Tq, Tk, D
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (1, 2, 64, 64, 64),
    (2, 2, 37, 130, 128),  # Tq < Tk: decoding with a KV cache, causal bottom-right aligned
    (1, 2, 130, 130, 64),
    (1, 1, 130, 61, 16),   # Tq > Tk: under the causal mask the first 69 queries see no key
    (1, 2, 300, 333, 32),  # longer than one query tile of every backend
]


def attention(backend, q, k, v, **kwargs):
    return fastgpt.attention(q, k, v, backend=backend, **kwargs)


def oracle_grads(q, k, v, grad_out, causal, mask=None, dropout_p=0.0, scale=None, seed=0, dtype=torch.float64,
                 window=None, softcap=None):
    """(dq, dk, dv) of reference.attention in `dtype` (float64: the oracle; q's dtype: the naive baseline)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, causal, mask, dropout_p, scale, seed, window, softcap)
    return torch.autograd.grad(out, leaves, grad_out.to(dtype))


def saved_output_grads(q, k, v, grad_out, out, causal, mask=None, dropout_p=0.0, scale=None, seed=0, window=None,
                       softcap=None):
    """float64 (dq, dk, dv) that a fused backward must give for its inputs, the saved `out` in
    q's dtype among them. Its delta = rowsum(dO ∘ out) (as FlashAttention's) differs from the
    exact rowsum(dO ∘ O) by c = rowsum(dO ∘ (O - out)); since d lse / d S = P, the gradients are
    the oracle's plus those of Σ c · lse (dv unchanged). In bfloat16 with a few keys per query c
    costs a few ulp more than the naive attention's own error."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = reference.attention(*leaves, causal, mask, dropout_p, scale, seed, window, softcap)
    lse = reference.attention_lse(leaves[0], leaves[1], causal, mask, scale, window, softcap)
    c = (grad_out.double() * (exact.detach() - out.detach().double())).sum(-1)
    lse_term = torch.where(torch.isfinite(lse), lse * c, torch.zeros_like(lse))  # no key: c = 0
    return torch.autograd.grad((exact * grad_out.double()).sum() + lse_term.sum(), leaves)


def check_grads(backend, q, k, v, causal, mask=None, dropout_p=0.0, scale=None, manual_seed=0, window=None,
                softcap=None):
    """Gradients of the backend (public API, autograd) against the float64 oracle."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    seed = drawn_seed(manual_seed) if dropout_p > 0 else 0
    torch.manual_seed(manual_seed)
    out = attention(backend, q, k, v, causal=causal, key_padding_mask=mask, dropout_p=dropout_p, scale=scale,
                    window=window, softcap=softcap)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    options = dict(window=window, softcap=softcap)
    want = oracle_grads(q, k, v, grad_out, causal, mask, dropout_p, scale, seed, **options)
    same = oracle_grads(q, k, v, grad_out, causal, mask, dropout_p, scale, seed, dtype=q.dtype, **options)
    for name, g, w, s in zip(("dq", "dk", "dv"), got, want, same):
        assert g.shape == w.shape and g.dtype == q.dtype
        assert_close(g, w, s, what=name)


def assert_lse_matches(lse, want):
    """The kernel's float32 lse against reference.attention_lse in float64: -inf exactly where
    a query sees no key, else within the float32 tolerance."""
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(want)) and (lse[torch.isinf(lse)] < 0).all()
    finite = torch.isfinite(want)
    if finite.any():
        assert_close(lse[finite], want[finite], what="lse")


def drawn_seed(manual_seed):
    """The dropout seed fastgpt.attention draws right after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return _draw_seed()


# ---- forward ------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Tq{}Tk{}D{}".format(*s))
def test_forward_matches_oracle(kernel, shape, causal):
    backend, device = kernel
    q, k, v = make_qkv(*shape, device=device)
    out = attention(backend, q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert_close(out, *attention_oracle(q, k, v, causal))


def test_forward_rows_without_keys_are_zero(kernel):
    """Tq > Tk, causal: query i sees key j iff j <= i + Tk - Tq, so the first Tq - Tk rows see nothing."""
    backend, device = kernel
    q, k, v = make_qkv(1, 2, 70, 20, 16, device=device)
    out = attention(backend, q, k, v, causal=True)
    assert torch.equal(out[:, :, :50], torch.zeros_like(out[:, :, :50]))
    assert_close(out, *attention_oracle(q, k, v, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 2, 61, 61, 64), (1, 3, 17, 130, 128)], ids=["T61D64", "Tq17Tk130D128"])
def test_forward_dtypes(kernel, shape, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    q, k, v = make_qkv(*shape, dtype=dtype, device=device)
    mask = padding_mask(shape[0], shape[3], device=device, fully_masked_row=False)
    out = attention(backend, q, k, v, causal=True, key_padding_mask=mask)
    assert out.dtype == dtype
    assert_close(out, *attention_oracle(q, k, v, True, mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 2, 17, 17, 16), (3, 1, 37, 130, 64)], ids=["T17", "Tq37Tk130"])
def test_padding_mask_with_a_fully_masked_row(kernel, shape, causal):
    """Batch 0 has no visible key at all: its rows are zeros, not NaN; the others match the oracle."""
    backend, device = kernel
    q, k, v = make_qkv(*shape, device=device)
    mask = padding_mask(shape[0], shape[3], device=device)
    out = attention(backend, q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close(out, *attention_oracle(q, k, v, causal, mask))


@pytest.mark.parametrize("scale", [0.3, -0.7], ids=["0.3", "negative"])
def test_custom_scale(kernel, scale):
    """A negative scale flips the scores' order: masking must happen after scaling."""
    backend, device = kernel
    q, k, v = make_qkv(2, 2, 37, 64, 32, device=device)
    mask = padding_mask(2, 64, device=device, fully_masked_row=False)
    out = attention(backend, q, k, v, causal=True, key_padding_mask=mask, scale=scale)
    assert_close(out, *attention_oracle(q, k, v, True, mask, scale=scale))


def test_noncontiguous_inputs_give_the_same_result(kernel):
    """q, k, v as (B, T, H, D) projections viewed (B, H, T, D), the layout a model produces."""
    backend, device = kernel
    shape = (2, 3, 37, 64, 32)
    q, k, v = make_qkv(*shape, device=device, transposed=True)
    assert not q.is_contiguous()
    out = attention(backend, q, k, v, causal=True)
    contiguous = attention(backend, q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, contiguous)
    assert_close(out, *attention_oracle(q, k, v, True))


# ---- backward -----------------------------------------------------------------------------

GRAD_CASES = [  # B, H, Tq, Tk, D, causal, masked
    (1, 2, 17, 17, 16, True, False),
    (2, 2, 37, 64, 32, True, True),      # Tq < Tk, fully masked batch 0
    (1, 1, 64, 130, 64, False, True),
    (2, 4, 130, 130, 64, True, False),   # B·H = 8: on up to 8 threads cpu's dQ needs no partial sums
    (1, 1, 61, 37, 128, True, False),    # Tq > Tk
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "B{}H{}Tq{}Tk{}D{}-{}-{}".format(
    *c[:5], "causal" if c[5] else "full", "masked" if c[6] else "nomask"))
def test_gradients_match_oracle(kernel, case):
    backend, device = kernel
    *shape, causal, masked = case
    q, k, v = make_qkv(*shape, device=device)
    mask = padding_mask(shape[0], shape[3], device=device) if masked else None
    check_grads(backend, q, k, v, causal, mask)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_gradients_for_any_thread_count(threads):
    """The cpu backward splits each head's key tiles into groups by thread count (each group
    sums its own dQ partial): every split gives the oracle's gradients."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 1, 300, 333, 32), (1, 3, 200, 390, 16)]:  # 6 and 7 key tiles of 64
            q, k, v = make_qkv(*shape)
            check_grads("cpu", q, k, v, True, padding_mask(shape[0], shape[3], fully_masked_row=False))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_gradients_low_precision(kernel, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    q, k, v = make_qkv(2, 2, 37, 64, 64, dtype=dtype, device=device)
    check_grads(backend, q, k, v, True, padding_mask(2, 64, device=device))


def test_gradients_custom_scale_and_expanded_grad(kernel):
    """out.sum().backward() hands the kernel an expanded (stride 0) grad_out."""
    backend, device = kernel
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 17, 37, 16, device=device))
    attention(backend, q, k, v, causal=True, scale=0.4).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.attention(*leaves, True, None, 0.0, 0.4).sum().backward()
    for name, t, oracle in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert_close(t.grad, oracle.grad, what=name)


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 3, 5, 4, dtype=torch.float64))
    mask = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]])
    for causal in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, v: fastgpt.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="cpu"),
            (q, k, v))
    # dropout: a fixed seed makes the function deterministic
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.fastgpt.attention_fwd(q, k, v, mask, True, 0.5, 0.3, 1234, 0, 0.0)[0], (q, k, v))
    # grouped-query heads, a window and a softcap (its tanh derivative) together
    k1, v1 = (t.detach()[:, :1].requires_grad_() for t in (k, v))
    for causal in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, v: fastgpt.attention(q, k, v, causal=causal, key_padding_mask=mask, window=2, softcap=0.7,
                                              backend="cpu"), (q, k1, v1))


# ---- dropout ------------------------------------------------------------------------------

def kept_weights(backend, device, B, H, Tq, Tk, p):
    """(B, H, Tq, Tk) indicator of the kept attention weights, read off the output: with q = 0
    every weight is 1/Tk, and v = identity (D = Tk) puts weight j of row i in out[..., i, j]."""
    q = torch.zeros(B, H, Tq, Tk, device=device)
    v = torch.eye(Tk, device=device).expand(B, H, Tk, Tk).contiguous()
    out = attention(backend, q, v, v, causal=False, dropout_p=p)
    scaled = out * ((1 - p) * Tk)
    assert torch.allclose(scaled, (scaled > 0.5).float(), atol=1e-5)  # every weight is 0 or 1/((1-p) Tk)
    return scaled > 0.5


def test_dropout_keep_rate(kernel):
    backend, device = kernel
    p = 0.25
    kept = kept_weights(backend, device, 2, 2, 64, 64, p)
    # 16384 Bernoulli(0.75) draws: standard deviation 0.0034
    assert abs(kept.float().mean().item() - (1 - p)) < 0.015


def test_dropout_is_repeatable_under_manual_seed(kernel):
    backend, device = kernel
    q, k, v = make_qkv(1, 2, 37, 64, 32, device=device)
    torch.manual_seed(7)
    first = attention(backend, q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(7)
    again = attention(backend, q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(8)
    other = attention(backend, q, k, v, causal=True, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("shape", [(2, 2, 37, 64, 32), (1, 1, 130, 130, 64)], ids=["Tq37Tk64", "T130"])
def test_dropout_matches_reference_with_the_same_mask(kernel, shape):
    """Same Philox mask as reference.attention(seed=...): the outputs and gradients agree."""
    backend, device = kernel
    q, k, v = make_qkv(*shape, device=device)
    mask = padding_mask(shape[0], shape[3], device=device)
    p = 0.3
    torch.manual_seed(11)
    out = attention(backend, q, k, v, causal=True, key_padding_mask=mask, dropout_p=p)
    assert_close(out, *attention_oracle(q, k, v, True, mask, p, seed=drawn_seed(11)))
    check_grads(backend, q, k, v, True, mask, dropout_p=p, manual_seed=11)


def test_dropout_zero_is_exact(kernel):
    backend, device = kernel
    q, k, v = make_qkv(2, 2, 37, 64, 32, device=device)
    without = attention(backend, q, k, v, causal=True)
    assert torch.equal(attention(backend, q, k, v, causal=True, dropout_p=0.0), without)
    assert_close(without, *attention_oracle(q, k, v, True))


@pytest.mark.parametrize("seed", [0, 987654321, 2**40 + 12345], ids=["0", "987654321", "above-2^32"])
def test_cpu_dropout_mask_is_bit_identical_to_reference(seed):
    """The kernel's kept weights, read off as in kept_weights, equal reference.dropout_keep_mask."""
    B, H, Tq, Tk, p = 2, 3, 37, 130, 0.4
    q = torch.zeros(B, H, Tq, Tk)
    v = torch.eye(Tk).expand(B, H, Tk, Tk).contiguous()
    out, _ = torch.ops.fastgpt.attention_fwd(q, v, v, None, False, 1.0, p, seed, 0, 0.0)
    kept = out * ((1 - p) * Tk) > 0.5
    assert torch.equal(kept, reference.dropout_keep_mask(seed, B, H, Tq, Tk, p))


# ---- return_lse: (out, lse), differentiable in both ----------------------------------------

@pytest.fixture(params=["naive", "sdpa", "cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("triton", marks=pytest.mark.triton)], ids=lambda b: f"backend={b}")
def any_backend(request):
    """(backend, device) for every backend, fused or not, that runs in this session."""
    return request.param, require_backend(request.param)


LSE_CASES = [  # B, Hq, Hkv, Tq, Tk, D, causal, window, softcap; batch 0 of each is fully padded
    (2, 2, 2, 37, 37, 32, True, None, None),
    (2, 4, 2, 70, 45, 16, True, None, None),   # Tq > Tk: the first 25 rows see no key (lse -inf)
    (2, 4, 1, 130, 130, 64, False, 33, 5.0),   # MQA, window, softcap
    (2, 6, 2, 3, 140, 32, True, 50, None),     # decoding: the split-KV kernels
]


def lse_loss(out, lse, grad_out, grad_lse):
    """<out, grad_out> + <lse, grad_lse> over the rows that see a key (lse -inf elsewhere)."""
    return (out * grad_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * grad_lse).sum()


@pytest.mark.parametrize("only_lse", [False, True], ids=["out+lse", "lse-only"])
@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-causal{}-w{}-cap{}".format(*c))
def test_return_lse_forward_and_gradients(any_backend, case, only_lse):
    """lse against reference.attention_lse, and the gradients of a loss of both outputs against the
    float64 oracle. lse-only: no gradient reaches out, so dv is exactly zero and dq, dk come from
    lse alone (a backward that ignored grad_lse would return zeros)."""
    backend, device = any_backend
    B, Hq, Hkv, Tq, Tk, D, causal, window, softcap = case
    q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, device)
    mask = padding_mask(B, Tk, device=device)
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.zeros(q.shape) if only_lse else torch.randn(q.shape, generator=gen)
    grad_lse = torch.randn(q.shape[:3], generator=gen)
    options = dict(causal=causal, key_padding_mask=mask, window=window, softcap=softcap)

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        loss = lse_loss(out, lse, grad_out.to(device, dtype), grad_lse.to(device, lse.dtype))
        return (out, lse), torch.autograd.grad(loss, leaves, allow_unused=True)

    (out, lse), got = run(q.dtype, lambda *t: fastgpt.attention(*t, return_lse=True, backend=backend, **options))

    def oracle(*t):
        return (reference.attention(*t, causal, mask, window=window, softcap=softcap),
                reference.attention_lse(*t[:2], causal, mask, window=window, softcap=softcap))

    (want_out, want_lse), want = run(torch.float64, oracle)
    _, same = run(q.dtype, oracle)
    assert_close(out, want_out, what="out")
    assert_lse_matches(lse, want_lse)
    assert torch.isinf(lse[0]).all()  # batch 0 sees no key
    for name, g, w, s in zip(("dq", "dk", "dv"), got, want, same):
        if only_lse and name == "dv":
            assert g is None or not g.any(), "dv must be zero when only lse is differentiated"
            continue
        assert w.abs().max() > 0, f"{name}: the case must produce a gradient"
        assert_close(g, w, s, what=name)


def test_return_lse_false_returns_out_only():
    q, k, v = make_qkv(1, 2, 9, 9, 16)
    out = fastgpt.attention(q, k, v, backend="cpu")
    both = fastgpt.attention(q, k, v, return_lse=True, backend="cpu")
    assert isinstance(out, torch.Tensor) and isinstance(both, tuple) and torch.equal(both[0], out)
    with pytest.raises(ValueError, match="return_lse must be a bool"):
        fastgpt.attention(q, k, v, return_lse=1)


def test_cpu_backward_rejects_a_bad_grad_lse():
    q, k, v = make_qkv(1, 2, 9, 9, 16)
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, None, True, 0.25, 0.0, 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="grad_lse must be float32"):
        torch.ops.fastgpt.attention_bwd(out, q, k, v, out, lse, None, True, 0.25, 0.0, 0, 0, 0.0, lse.double())


# ---- cpu op level -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_lse_matches_reference(causal):
    B, H, Tq, Tk, D = 2, 2, 70, 45, 24  # Tq > Tk: under the causal mask early rows have lse = -inf
    q, k, v = make_qkv(B, H, Tq, Tk, D)
    mask = padding_mask(B, Tk)
    _, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, causal, 0.3, 0.0, 0, 0, 0.0)
    assert lse.shape == (B, H, Tq)
    assert_lse_matches(lse, reference.attention_lse(q.double(), k.double(), causal, mask, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("kv_heads, window, softcap", [(2, 0, 0.0), (1, 9, 3.0)], ids=["mha", "mqa-window-softcap"])
def test_cpu_opcheck(dtype, kv_heads, window, softcap):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 17, 37, 16, dtype=dtype))
    k, v = (t.detach()[:, :kv_heads].requires_grad_() for t in (k, v))
    mask = padding_mask(2, 37)
    fwd_args = (q, k, v, mask, True, 0.25, 0.1, 42, window, softcap)
    torch.library.opcheck(torch.ops.fastgpt.attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastgpt.attention_fwd(*fwd_args)
    grad_out = torch.randn_like(out)
    bwd_args = (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, True, 0.25, 0.1, 42, window, softcap)
    torch.library.opcheck(torch.ops.fastgpt.attention_bwd.default, bwd_args)


@pytest.mark.parametrize("args, message", [
    (lambda q, k, v: (q, k, v, torch.ones(2, 5, dtype=torch.bool), True, 1.0, 0.0, 0, 0, 0.0),
     r"fastgpt::attention_fwd: key_padding_mask must be bool \(B, Tk\) = \(2, 4\), got Bool \[2, 5\]"),
    (lambda q, k, v: (q, k, v, None, True, 1.0, 1.0, 0, 0, 0.0), r"fastgpt::attention_fwd: dropout_p must be in \[0, 1\), got 1"),
    (lambda q, k, v: (q, k[:, :, :, :4], v[:, :, :, :4], None, True, 1.0, 0.0, 0, 0, 0.0), r"fastgpt::attention_fwd: q and k, v must agree in B and D"),
    (lambda q, k, v: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), None, True, 1.0, 0.0, 0, 0, 0.0), r"fastgpt::attention_fwd: the query heads Hq must be a multiple of the key/value heads Hkv, got 2 and 3"),
    (lambda q, k, v: (q, k, v, None, True, 1.0, 0.0, 0, -1, 0.0), r"fastgpt::attention_fwd: window must be >= 0 \(0: none\), got -1"),
    (lambda q, k, v: (q, k.double(), v.double(), None, True, 1.0, 0.0, 0, 0, 0.0), r"fastgpt::attention_fwd: q, k and v must share one dtype, got Float, Double, Double"),
])
def test_cpu_kernel_checks_its_preconditions(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.attention_fwd(*args(*make_qkv(2, 2, 3, 4, 8)))


def test_cpu_kernel_head_dims_are_the_declared_ones():
    # backends.py declares the cpu backend's head dims; the C++ kernels enforce their own limit.
    dims = backends.REGISTRY["cpu"].head_dims
    for D in (dims[0], dims[-1]):
        torch.ops.fastgpt.attention_fwd(*make_qkv(1, 1, 2, 2, D), None, True, 1.0, 0.0, 0, 0, 0.0)
    with pytest.raises(RuntimeError, match=rf"fastgpt::attention_fwd: head dim must be 1..{dims[-1]} "
                                           rf"\(the CPU kernels\), got {dims[-1] + 1}"):
        torch.ops.fastgpt.attention_fwd(*make_qkv(1, 1, 2, 2, dims[-1] + 1), None, True, 1.0, 0.0, 0, 0, 0.0)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), group=st.sampled_from([1, 1, 2, 3]), Tq=st.integers(1, 80),
       Tk=st.integers(1, 80), D=st.sampled_from([1, 3, 8, 16, 24, 40, 64]), causal=st.booleans(),
       masked=st.booleans(), window=st.one_of(st.none(), st.integers(1, 90)),
       softcap=st.sampled_from([None, None, 0.5, 30.0]), dropout_p=st.sampled_from([0.0, 0.0, 0.35]),
       scale=st.floats(-1.0, 1.0), mask_seed=st.integers(0, 2**16))
def test_cpu_property_random_shapes(B, Hkv, group, Tq, Tk, D, causal, masked, window, softcap, dropout_p, scale,
                                    mask_seed):
    """Any shape, head dim, GQA group, window, softcap, mask, scale and dropout: output, lse and
    gradients match the oracle."""
    q, _, _ = make_qkv(B, Hkv * group, Tq, Tk, D, generator_seed=mask_seed)
    _, k, v = make_qkv(B, Hkv, Tq, Tk, D, generator_seed=mask_seed + 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = (torch.rand(B, Tk, generator=torch.Generator().manual_seed(mask_seed)) > 0.4) if masked else None
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, causal, scale, dropout_p, mask_seed, window or 0,
                                               softcap or 0.0)
    options = dict(window=window, softcap=softcap)
    oracle = reference.attention(q.double(), k.double(), v.double(), causal, mask, dropout_p, scale, mask_seed,
                                 **options)
    assert_close(out, oracle)
    assert_lse_matches(lse, reference.attention_lse(q.double(), k.double(), causal, mask, scale, **options))
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = oracle_grads(q, k, v, grad_out, causal, mask, dropout_p, scale, mask_seed, **options)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, what=name)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), Tq=st.integers(17, 300),
       Tk=st.integers(1, 300), D=st.sampled_from([1, 3, 16, 24, 64, 80]), causal=st.booleans(),
       masked=st.booleans(), window=st.one_of(st.none(), st.integers(1, 150)),
       softcap=st.sampled_from([None, None, 30.0]), dropout_p=st.sampled_from([0.0, 0.0, 0.35]),
       scale=st.floats(-1.0, 1.0), mask_seed=st.integers(0, 2**16))
def test_cpu_bfloat16_prefill_random_shapes(B, Hkv, group, Tq, Tk, D, causal, masked, window, softcap, dropout_p,
                                            scale, mask_seed):
    """The bfloat16 prefill forward and backward (bf16 dot products where the CPU has them: pairs
    of head dims, of queries and of keys, key ranges widened to whole key pairs at any offset)
    against the oracle (the gradients: for the saved bfloat16 output, saved_output_grads), within
    the error of the naive attention in bfloat16, and lse within float32's: several key tiles,
    odd D, odd query and key counts and offsets (windows, Tq != Tk, causal blocks)."""
    q, _, _ = make_qkv(B, Hkv * group, Tq, Tk, D, dtype=torch.bfloat16, generator_seed=mask_seed)
    _, k, v = make_qkv(B, Hkv, Tq, Tk, D, dtype=torch.bfloat16, generator_seed=mask_seed + 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = (torch.rand(B, Tk, generator=torch.Generator().manual_seed(mask_seed)) > 0.4) if masked else None
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, causal, scale, dropout_p, mask_seed, window or 0,
                                               softcap or 0.0)
    options = dict(window=window, softcap=softcap)
    oracle, same = attention_oracle(q, k, v, causal, mask, dropout_p, scale, mask_seed, **options)
    assert_close(out.detach(), oracle, same)
    assert_lse_matches(lse, reference.attention_lse(q.double(), k.double(), causal, mask, scale, **options))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(mask_seed + 2)).bfloat16()
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = saved_output_grads(q, k, v, grad_out, out, causal, mask, dropout_p, scale, mask_seed, **options)
    same = oracle_grads(q, k, v, grad_out, causal, mask, dropout_p, scale, mask_seed, dtype=torch.bfloat16, **options)
    for name, g, w, s in zip(("dq", "dk", "dv"), got, want, same):
        assert_close(g, w, s, what=name)


# ---- memory: nothing of size Tq x Tk ------------------------------------------------------

_PEAK_RSS = """
import sys, torch, fastgpt

def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

backend, backward = sys.argv[1], sys.argv[2] == "1"
# The cpu backward keeps one (Tq, D) dQ partial per key group, up to one group per thread:
# a fixed thread count makes the bound below machine-independent.
torch.set_num_threads(4)
q, k, v = (torch.randn(1, 1, 4096, 64).requires_grad_(backward) for _ in range(3))
grad_out = torch.randn(1, 1, 4096, 64)
small = torch.randn(1, 1, 200, 64, requires_grad=backward)  # warm-up: thread pool, lazy init
out = fastgpt.attention(small, small, small, causal=True, backend=backend)
if backward:
    out.backward(torch.randn_like(out))
before = status_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
out = fastgpt.attention(q, k, v, causal=True, backend=backend)
if backward:
    out.backward(grad_out)
print(status_mib("VmHWM") - before)
"""
SCORE_MATRIX_BYTES = 4096 * 4096 * 4  # one float32 (Tq, Tk) matrix at T = 4096: 64 MiB


def peak_extra_bytes(backend, backward):
    """Growth of the peak resident set of a fresh process over one T=4096 attention call: Linux's
    VmHWM after resetting it, which sees every allocation, torch's or not."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, backend, "1" if backward else "0"],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_cpu_allocates_nothing_quadratic(backward):
    assert peak_extra_bytes("cpu", backward) < SCORE_MATRIX_BYTES / 4


def test_peak_memory_measure_catches_the_naive_backend():
    """The measure above is not vacuous: the book's attention materialises (Tq, Tk) matrices."""
    assert peak_extra_bytes("naive", False) > SCORE_MATRIX_BYTES


# ---- modern attention: grouped-query heads, sliding windows, logit softcap -----------------
# Every fused backend runs these once it declares the feature (fastgpt/backends.py); which
# backends must declare which features is pinned by test_declared_attention_features.

DECLARED_FEATURES = {"cpu": frozenset({"gqa", "window", "softcap"}), "cuda": frozenset({"gqa", "window", "softcap"}), "triton": frozenset({"gqa", "window", "softcap"})}


def test_declared_attention_features():
    for name, features in DECLARED_FEATURES.items():
        assert backends.REGISTRY[name].features == features, name


def require_features(backend, **options):
    needed = backends.attention_features(options.get("q_heads", 1), options.get("kv_heads", 1),
                                         options.get("window"), options.get("softcap"))
    missing = needed - backends.REGISTRY[backend].features
    if missing:
        pytest.skip(f"{backend} does not declare {', '.join(sorted(missing))} (test_declared_attention_features "
                    f"pins that)")


def gqa_inputs(B, Hq, Hkv, Tq, Tk, D, device, dtype=torch.float32, transposed=False):
    q, _, _ = make_qkv(B, Hq, Tq, Tk, D, dtype=dtype, device=device, transposed=transposed)
    _, k, v = make_qkv(B, Hkv, Tq, Tk, D, dtype=dtype, device=device, transposed=transposed, generator_seed=5)
    return q, k, v


MODERN_CASES = [  # B, Hq, Hkv, Tq, Tk, D, window, softcap
    (2, 4, 2, 37, 37, 32, None, None),     # GQA, group 2
    (1, 6, 1, 17, 130, 64, None, None),    # MQA, decoding Tq < Tk
    (2, 2, 2, 130, 130, 16, 16, None),     # window smaller than a tile
    (1, 4, 2, 300, 333, 32, 100, None),    # window across tiles, GQA, Tq < Tk
    (1, 2, 2, 61, 61, 64, 1, None),        # window 1: each query sees only itself (causal)
    (2, 2, 1, 37, 64, 32, None, 5.0),      # softcap with MQA
    (1, 4, 2, 130, 130, 128, 33, 20.0),    # all three
    (1, 4, 2, 45, 70, 80, 20, None),       # head dims the GPU backends pad to a power of two
    (2, 2, 2, 37, 37, 96, None, 8.0),
    (1, 2, 1, 33, 65, 256, 17, 30.0),      # Gemma's head dim, MQA
]


def modern_id(case):
    B, Hq, Hkv, Tq, Tk, D, window, softcap = case
    return f"B{B}Hq{Hq}Hkv{Hkv}Tq{Tq}Tk{Tk}D{D}-w{window}-cap{softcap}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", MODERN_CASES, ids=modern_id)
def test_modern_forward_matches_oracle(kernel, case, causal):
    backend, device = kernel
    B, Hq, Hkv, Tq, Tk, D, window, softcap = case
    require_features(backend, q_heads=Hq, kv_heads=Hkv, window=window, softcap=softcap)
    q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, device)
    mask = padding_mask(B, Tk, device=device)
    out = attention(backend, q, k, v, causal=causal, key_padding_mask=mask, window=window, softcap=softcap)
    assert out.shape == q.shape
    assert_close(out, *attention_oracle(q, k, v, causal, mask, window=window, softcap=softcap))


@pytest.mark.parametrize("case", MODERN_CASES, ids=modern_id)
def test_modern_gradients_match_oracle(kernel, case):
    backend, device = kernel
    B, Hq, Hkv, Tq, Tk, D, window, softcap = case
    require_features(backend, q_heads=Hq, kv_heads=Hkv, window=window, softcap=softcap)
    q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, device)
    check_grads(backend, q, k, v, True, padding_mask(B, Tk, device=device), window=window, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_modern_low_precision_and_noncontiguous(kernel, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    require_features(backend, q_heads=4, kv_heads=2, window=20, softcap=30.0)
    q, k, v = gqa_inputs(2, 4, 2, 61, 61, 64, device, dtype=dtype, transposed=True)
    out = attention(backend, q, k, v, causal=True, window=20, softcap=30.0)
    assert_close(out, *attention_oracle(q, k, v, True, window=20, softcap=30.0))
    check_grads(backend, q, k, v, True, window=20, softcap=30.0)


def test_modern_dropout_matches_the_oracle_mask(kernel):
    """Dropout with GQA and a window: the Philox mask is keyed by the query head (b * Hq + h)."""
    backend, device = kernel
    require_features(backend, q_heads=4, kv_heads=2, window=9)
    q, k, v = gqa_inputs(1, 4, 2, 37, 37, 16, device)
    check_grads(backend, q, k, v, True, dropout_p=0.3, manual_seed=11, window=9)


# ---- cpu: grouped-query backward and window tile skipping ---------------------------------

@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_gqa_gradients_for_any_thread_count_are_deterministic(threads):
    """The cpu backward sums dK, dV over a kv head's query heads inside one task (each row has
    one writer): for every thread count the gradients match the oracle and repeat bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, Hq, Hkv, Tq, Tk, D, window in [(1, 4, 1, 300, 333, 32, None), (2, 6, 2, 200, 390, 16, 70)]:
            q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, "cpu")
            mask = padding_mask(B, Tk, fully_masked_row=False)
            check_grads("cpu", q, k, v, True, mask, window=window, softcap=15.0)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
            runs = []
            for _ in range(2):
                out = fastgpt.attention(*leaves, causal=True, key_padding_mask=mask, window=window,
                                        softcap=15.0, backend="cpu")
                runs.append(torch.autograd.grad(out, leaves, grad_out))
            for first, second in zip(*runs):
                assert torch.equal(first, second)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_window_never_visits_keys_outside_it(causal):
    """Keys no query's window reaches are never read, forward or backward: NaN there leaves the
    output and dq exact, and their dK, dV rows are zero (a visited tile would multiply NaN by 0)."""
    B, H, Tq, Tk, D, window = 1, 2, 64, 1024, 32, 48
    q, k, v = make_qkv(B, H, Tq, Tk, D)
    unseen = Tk - Tq - window + 1  # keys [0, unseen) are outside every query's window
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :unseen - 200] = float("nan")  # leave the partly visited tiles alone
    poisoned_v[:, :, :unseen - 200] = float("nan")
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for kk, vv in [(k, v), (poisoned_k, poisoned_v)]:
        leaves = [t.detach().requires_grad_() for t in (q, kk, vv)]
        out = fastgpt.attention(*leaves, causal=causal, window=window, backend="cpu")
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    (out, dq, dk, dv), (p_out, p_dq, p_dk, p_dv) = results
    assert torch.equal(out, p_out) and torch.equal(dq, p_dq)
    assert torch.equal(dk[:, :, unseen - 200:], p_dk[:, :, unseen - 200:])
    assert torch.equal(dv[:, :, unseen - 200:], p_dv[:, :, unseen - 200:])
    assert not p_dk[:, :, :unseen].any() and not p_dv[:, :, :unseen].any()
    assert_close(out, *attention_oracle(q, k, v, causal, window=window))


# ---- decoding: Tq <= DECODE_MAX_QUERIES takes each backend's split-KV forward -------------------

DECODE_CASES = [  # B, Hq, Hkv, Tq, Tk, D, window, softcap
    (1, 1, 1, 1, 1, 16, None, None),       # one cached key
    (2, 4, 4, 1, 256, 64, None, None),     # Tq = 1, Tk a whole number of key chunks
    (1, 8, 2, 1, 300, 32, None, None),     # GQA group 4 in one tile, Tk not a multiple of anything
    (1, 4, 1, 2, 640, 16, None, None),     # MQA: every kv head split into several chunks
    (2, 6, 3, 5, 257, 80, 37, None),       # window, padded head dim
    (1, 4, 2, 16, 130, 64, None, 5.0),     # the largest decode Tq, softcap
    (1, 2, 2, 16, 1000, 32, 100, None),    # window far inside a long cache
    (1, 16, 2, 16, 70, 16, None, None),    # a group of 8 x 16 queries: several row tiles
    (2, 2, 1, 7, 5, 16, None, None),       # Tq > Tk: under the causal mask the first rows see nothing
]


def decode_id(case):
    return modern_id(case).replace("B", "decode-B", 1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=decode_id)
def test_decode_forward_matches_oracle(kernel, case, causal):
    backend, device = kernel
    B, Hq, Hkv, Tq, Tk, D, window, softcap = case
    require_features(backend, q_heads=Hq, kv_heads=Hkv, window=window, softcap=softcap)
    q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, device)
    for mask in (None, padding_mask(B, Tk, device=device)):  # the mask's batch 0 sees no key
        out = attention(backend, q, k, v, causal=causal, key_padding_mask=mask, window=window, softcap=softcap)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, *attention_oracle(q, k, v, causal, mask, window=window, softcap=softcap))
        if mask is not None:
            assert not out[0].any()


@pytest.mark.parametrize("case", [DECODE_CASES[2], DECODE_CASES[4]], ids=decode_id)
def test_decode_gradients_match_oracle(kernel, case):
    """The backward of a decode forward (it recomputes from the decode kernel's out and lse)."""
    test_modern_gradients_match_oracle(kernel, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_decode_low_precision_and_noncontiguous(kernel, dtype):
    backend, device = kernel
    skip_unsupported_dtype(backend, device, dtype)
    require_features(backend, q_heads=8, kv_heads=2, window=50)
    q, k, v = gqa_inputs(2, 8, 2, 3, 333, 64, device, dtype=dtype, transposed=True)
    out = attention(backend, q, k, v, causal=True, window=50)
    assert_close(out, *attention_oracle(q, k, v, True, window=50))


def test_decode_dropout_matches_the_oracle_mask(kernel):
    """Dropout keyed by the query head and element i * Tk + j, as in the prefill forward."""
    backend, device = kernel
    require_features(backend, q_heads=4, kv_heads=2)
    q, k, v = gqa_inputs(1, 4, 2, 3, 300, 16, device)
    check_grads(backend, q, k, v, True, dropout_p=0.3, manual_seed=11)


def test_cpu_decode_bound_is_the_declared_one():
    assert fastgpt._extension._C.decode_max_queries == backends.DECODE_MAX_QUERIES


@pytest.mark.parametrize("Tq", [1, 4, 16, 17], ids=lambda t: f"Tq{t}")
def test_cpu_decode_lse_matches_reference(Tq):
    """Both forwards (decode up to 16 queries, prefill from 17) save the same lse for the backward."""
    B, Hq, Hkv, Tk, D = 2, 6, 2, 390, 32
    q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, "cpu")
    mask = padding_mask(B, Tk)
    for causal, window, softcap in [(True, 0, 0.0), (False, 50, 7.0)]:
        out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, causal, 0.3, 0.0, 0, window, softcap)
        want = reference.attention_lse(q.double(), k.double(), causal, mask, 0.3, window or None, softcap or None)
        assert_lse_matches(lse, want)
        assert torch.isinf(lse[0]).all() and not out[0].any()


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_decode_for_any_thread_count(threads):
    """The number of key chunks follows the thread count: every split merges to the same answer."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, Hq, Hkv, Tq, Tk, D in [(1, 2, 1, 1, 1500, 32), (1, 4, 2, 9, 1023, 16)]:
            q, k, v = gqa_inputs(B, Hq, Hkv, Tq, Tk, D, "cpu")
            mask = padding_mask(B, Tk, fully_masked_row=False)
            out = fastgpt.attention(q, k, v, causal=True, key_padding_mask=mask, backend="cpu")
            assert_close(out, *attention_oracle(q, k, v, True, mask))
    finally:
        torch.set_num_threads(before)


def test_cpu_decode_reads_no_key_past_the_last_kept_one():
    """A static KV cache is attended with a mask hiding its unfilled tail: the cpu decode forward
    stops at the last kept key, so whatever the tail holds (NaN here) is never read."""
    B, Hq, Hkv, Tk, D, filled = 2, 4, 2, 1000, 32, 613
    q, k, v = gqa_inputs(B, Hq, Hkv, 1, Tk, D, "cpu")
    mask = torch.arange(Tk) < filled
    mask = mask.expand(B, Tk).clone()
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, filled:] = float("nan")
    poisoned_v[:, :, filled:] = float("nan")
    out = fastgpt.attention(q, poisoned_k, poisoned_v, causal=False, key_padding_mask=mask, backend="cpu")
    want = fastgpt.attention(q, k[:, :, :filled], v[:, :, :filled], causal=False, backend="cpu")
    assert torch.equal(out, want)
    assert_close(out, *attention_oracle(q, k, v, False, mask))
