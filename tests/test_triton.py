"""What is specific to the Triton backend (fastgpt/triton): its dropout stream, the tile
split of its causal masking, its saved log-sum-exp, its operator registration, its
autotuning key, its padded (80, 96) and wide (256) head dims and its layer-norm weight-gradient
reduction. The behaviour every backend
shares is tested by test_attention.py / test_layer_norm.py through the `kernel` fixture.

On a CPU-only machine these run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), float32 and float16 only (the interpreter has no bfloat16 tl.dot).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from checks import assert_close, attention_oracle, make_qkv, padding_mask, tolerance
from conftest import HAS_GPU, require_backend
from fastgpt import reference

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def device():
    return require_backend("triton")


@pytest.fixture(scope="module")
def kernels(device):
    """The fastgpt.triton modules (imported by the registry once Triton can run here)."""
    from fastgpt.triton import _launch, attention, layer_norm
    return attention, layer_norm, _launch


def with_grads(attention_fn, q, k, v, grad_out):
    """(out, dq, dk, dv) of attention_fn(q, k, v) for the upstream gradient grad_out."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention_fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out, q.grad, k.grad, v.grad


def attention_and_grads(q, k, v, causal, key_padding_mask=None, dropout_p=0.0, scale=None, seed=0,
                        naive_baseline=False, window=0, softcap=0.0):
    """(out, dq, dk, dv) of fastgpt.triton.attention.attention, of the float64 oracle and, with
    naive_baseline, of the naive reference in q's dtype (the half-precision error baseline)."""
    import fastgpt.triton
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, H, Tq, D = q.shape
    grad_out = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(7)).to(q.device, q.dtype)
    args = (causal, key_padding_mask, dropout_p, scale, seed)
    got = with_grads(lambda *qkv: fastgpt.triton.attention.attention(*qkv, *args, window, softcap), q, k, v, grad_out)
    options = dict(window=window or None, softcap=softcap or None)  # the oracle's "none" is None
    oracle = with_grads(lambda *qkv: attention_oracle(*qkv, *args, **options)[0], q.double(), k.double(), v.double(),
                        grad_out)
    if not naive_baseline:
        return got, oracle
    return got, oracle, with_grads(lambda *qkv: attention_oracle(*qkv, *args, **options)[1], q, k, v, grad_out)


def assert_all_close(got, oracle, baseline=None):
    names = ("out", "grad_q", "grad_k", "grad_v")
    for i, name in enumerate(names):
        assert_close(got[i], oracle[i], None if baseline is None else baseline[i], what=name)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("causal,Tq,Tk", [(False, 50, 64), (True, 50, 64), (True, 64, 64)])
@pytest.mark.parametrize("seed", [1234, 2**31 + 99])
def test_dropout_mask_is_the_reference_philox_mask(device, kernels, causal, Tq, Tk, seed):
    # With q = 0 every visible key gets the same weight 1/n_i, and with v = I the output row
    # is the (dropped, rescaled) weight row itself: out != 0 exactly where a weight was kept.
    triton_attention = kernels[0]
    B, H, p = 2, 3, 0.4
    q = torch.zeros(B, H, Tq, Tk, device=device)
    k = torch.randn(B, H, Tk, Tk, generator=torch.Generator().manual_seed(0)).to(device)
    v = torch.eye(Tk, device=device).expand(B, H, Tk, Tk)
    out, _ = triton_attention.attention_fwd(q, k, v, None, causal, 0.125, p, seed, 0, 0.0)
    keep = reference.dropout_keep_mask(seed, B, H, Tq, Tk, p, device)
    visible = reference.visible_keys(Tq, Tk, causal, None, device)
    assert torch.equal(out != 0, keep & visible)
    weight = (1.0 / visible.sum(-1, keepdim=True)) / (1.0 - p)  # (1, 1, Tq, 1)
    torch.testing.assert_close(out, torch.where(keep & visible, weight, 0.0).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,Tq,Tk,masked", [(True, 45, 45, False), (False, 37, 70, True), (True, 20, 53, True)])
def test_dropout_output_and_grads_equal_the_reference_with_that_mask(device, dtype, causal, Tq, Tk, masked):
    q, k, v = make_qkv(2, 2, Tq, Tk, 32, dtype=dtype, device=device)
    mask = padding_mask(2, Tk, device=device) if masked else None
    got, oracle, naive = attention_and_grads(q, k, v, causal, mask, dropout_p=0.3, seed=987, naive_baseline=True)
    assert_all_close(got, oracle, naive)


def test_dropout_changes_with_the_seed_and_repeats_with_it(device):
    import fastgpt.triton
    q, k, v = make_qkv(1, 2, 33, 33, 16, device=device)
    first = fastgpt.triton.attention.attention(q, k, v, True, None, 0.5, 0.25, 11)
    assert torch.equal(first, fastgpt.triton.attention.attention(q, k, v, True, None, 0.5, 0.25, 11))
    assert not torch.equal(first, fastgpt.triton.attention.attention(q, k, v, True, None, 0.5, 0.25, 12))


# ----------------------------------------------------------------------------- tile boundaries

# On a GPU every candidate config is forced in turn (an Autotuner with one config runs it
# without tuning); under the interpreter each kernel has its single config.
CONFIG_SETS = list(range(5)) if HAS_GPU else [None]


@pytest.fixture(params=CONFIG_SETS, ids=lambda i: "interpreter-config" if i is None else f"gpu-config{i}")
def forced_configs(request, kernels, monkeypatch):
    """The (forward, dK/dV, dQ) configs the attention kernels run with in this test."""
    triton_attention = kernels[0]
    autotuners = (triton_attention._attention_fwd_kernel, triton_attention._attention_bwd_dkdv_kernel,
                  triton_attention._attention_bwd_dq_kernel)
    if request.param is None:
        return [tuner.configs[0] for tuner in autotuners]
    chosen = [configs[128][request.param] for configs in (triton_attention.FWD_CONFIGS,
                                                          triton_attention.DKDV_CONFIGS, triton_attention.DQ_CONFIGS)]
    for tuner, config in zip(autotuners, chosen):
        monkeypatch.setattr(tuner, "configs", [config])
    return chosen


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", ["square", "fewer_queries", "more_queries"])
def test_tile_split_at_block_boundaries(device, forced_configs, causal, shape):
    # Lengths just below, at and just above every block size in use. Tq = Tk exercises the
    # diagonal / off-diagonal split; Tk - Tq = 21 (not a multiple of any block) moves the causal
    # diagonal inside the tiles; Tq > Tk leaves the first Tq - Tk rows with no visible key.
    blocks = {config.kwargs[name] for config in forced_configs for name in ("BLOCK_M", "BLOCK_N")}
    for T in sorted({block + delta for block in blocks for delta in (-1, 0, 1)}):
        Tq, Tk = {"square": (T, T), "fewer_queries": (T, T + 21), "more_queries": (T + 9, T)}[shape]
        q, k, v = make_qkv(1, 1, Tq, Tk, 16, device=device, generator_seed=T)
        mask = padding_mask(1, Tk, device=device, fully_masked_row=False) if shape == "fewer_queries" else None
        got, oracle = attention_and_grads(q, k, v, causal, mask)
        try:
            assert_all_close(got, oracle)
        except AssertionError as error:
            raise AssertionError(f"Tq={Tq}, Tk={Tk}: {error}") from None


# ----------------------------------------------------------------------------- head dims

# Small odd shapes that cross tile boundaries, each with a mix of today's features:
# (causal, Hq, Hkv, Tq, Tk, key padding, dropout_p, window, softcap).
HEAD_DIM_CASES = {
    "causal-gqa-padded-decode": (True, 4, 2, 19, 37, True, 0.0, 0, 0.0),
    "causal-mqa-window-softcap": (True, 3, 1, 29, 29, False, 0.0, 7, 5.0),
    "full-gqa-padded-dropout": (False, 4, 2, 23, 41, True, 0.2, 0, 0.0),
    "full-window-softcap-padded": (False, 2, 2, 33, 33, True, 0.0, 9, 3.0),
}


def nan_padded(t, extra=48):
    """t as a view into a wider tensor whose `extra` trailing columns are NaN: a kernel that read
    past the head dim (a missing column mask) would bring NaN into its dot products."""
    wide = torch.full((*t.shape[:-1], t.shape[-1] + extra), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., :t.shape[-1]] = t
    return wide[..., :t.shape[-1]]


@pytest.mark.parametrize("case", list(HEAD_DIM_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [80, 96, 256])
def test_padded_and_wide_head_dims_match_the_oracle(device, D, dtype, case):
    # 80 and 96 run in a 128-wide tile whose extra columns are masked off; 256 has its own tiles.
    # q, k, v are views into wider, NaN-padded rows (and k, v into wider head stacks), so every
    # load goes by strides and one that is not masked to the head dim makes the results NaN.
    causal, Hq, Hkv, Tq, Tk, masked, dropout_p, window, softcap = HEAD_DIM_CASES[case]
    q, k, v = (nan_padded(t) for t in make_qkv(2, Hq, Tq, Tk, D, dtype=dtype, device=device, generator_seed=D))
    k, v = k[:, :Hkv], v[:, :Hkv]
    mask = padding_mask(2, Tk, device=device) if masked else None  # batch 0 sees no key at all
    got, oracle, naive = attention_and_grads(q, k, v, causal, mask, dropout_p, seed=31, naive_baseline=True,
                                             window=window, softcap=softcap)
    assert got[0].shape == q.shape and got[2].shape == k.shape
    assert_all_close(got, oracle, naive)


@pytest.mark.parametrize("D", [48, 512])
def test_unsupported_head_dims_get_the_clear_error(device, D):
    import fastgpt
    q, k, v = make_qkv(1, 1, 8, 8, D, device=device)
    with pytest.raises((ValueError, RuntimeError),
                       match=rf"head dim must be 16, 32, 64, 80, 96, 128 or 256, got {D}"):
        fastgpt.attention(q, k, v, backend="triton")


# ----------------------------------------------------------------------------- log-sum-exp

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,Tq,Tk", [(True, 40, 40), (True, 19, 50), (True, 50, 19), (False, 33, 47)])
def test_saved_lse_equals_the_reference_lse(device, kernels, dtype, causal, Tq, Tk):
    triton_attention = kernels[0]
    q, k, v = make_qkv(2, 2, Tq, Tk, 32, dtype=dtype, device=device)
    mask = padding_mask(2, Tk, device=device)  # batch 0 sees no key at all
    scale = 0.3
    out, lse = triton_attention.attention_fwd(q, k, v, mask, causal, scale, 0.0, 0, 0, 0.0)
    want = reference.attention_lse(q.double(), k.double(), causal, mask, scale)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, Tq)
    no_key = torch.isneginf(want)
    assert no_key[0].all() and torch.equal(torch.isneginf(lse), no_key)
    assert not torch.isnan(lse).any()
    # lse is float32 arithmetic on exactly representable inputs: the float32 rule holds for float16 too.
    err, tol = (lse[~no_key].double() - want[~no_key]).abs().max().item(), tolerance(torch.float32, want[~no_key], None)
    assert err <= tol, f"lse: max abs err {err:.3e} > tol {tol:.3e}"
    assert (out[0] == 0).all()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on any 1/0 or log(0)
def test_rows_with_no_visible_key_give_zero_output_and_zero_grads(device):
    # Causal with Tq > Tk: rows 0..Tq-Tk-1 see no key; batch 0 is fully padded.
    q, k, v = make_qkv(2, 2, 30, 12, 16, device=device)
    mask = padding_mask(2, 12, device=device)
    (out, dq, dk, dv), oracle = attention_and_grads(q, k, v, True, mask)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
    assert (out[:, :, :18] == 0).all() and (dq[:, :, :18] == 0).all()
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert_all_close((out, dq, dk, dv), oracle)


# ----------------------------------------------------------------------------- registration

def test_ops_are_registered_next_to_the_extension_ops(device, kernels):
    for name in ("triton_attention_fwd", "triton_attention_bwd", "triton_layer_norm_fwd", "triton_layer_norm_bwd"):
        assert hasattr(torch.ops.fastgpt, name)


def test_opcheck(device, kernels):
    triton_attention, triton_layer_norm, _ = kernels
    q, k, v = make_qkv(1, 2, 17, 23, 16, device=device, requires_grad=True)
    mask = padding_mask(1, 23, device=device, fully_masked_row=False)
    torch.library.opcheck(triton_attention.attention_fwd, (q, k, v, mask, True, 0.25, 0.2, 5, 0, 0.0))
    out, lse = triton_attention.attention_fwd(q, k, v, mask, True, 0.25, 0.2, 5, 0, 0.0)
    torch.library.opcheck(triton_attention.attention_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask,
                           True, 0.25, 0.2, 5, 0, 0.0))
    x = torch.randn(9, 40, device=device, requires_grad=True)
    w, b = torch.randn(40, device=device, requires_grad=True), torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(triton_layer_norm.layer_norm_fwd, (x, w, b, 1e-5))
    _, mean, rstd = triton_layer_norm.layer_norm_fwd(x, w, b, 1e-5)
    torch.library.opcheck(triton_layer_norm.layer_norm_bwd, (torch.randn(9, 40, device=device), x.detach(),
                                                            w.detach(), mean.detach(), rstd.detach()))


def test_double_backward_through_the_triton_ops_raises_clearly(device):
    # The op contract (fastgpt/_registration.py) guards the Triton backward operators as it does
    # the C++ ones (tests/test_registration.py).
    import fastgpt
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 8, 8, 16, device=device))
    grad_q, = torch.autograd.grad(fastgpt.attention(q, k, v, backend="triton").sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad_q.sum().backward()
    x = torch.randn(4, 16, device=device, requires_grad=True)
    y = fastgpt.layer_norm(x, None, None, backend="triton")
    grad_x, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grad_x.sum().backward()


def test_ops_check_their_own_preconditions(device, kernels):
    # fastgpt.ops validates the public API; the registered ops can be called directly too.
    triton_attention, triton_layer_norm, _ = kernels
    q, k, v = make_qkv(1, 1, 8, 8, 24, device=device)
    with pytest.raises(RuntimeError, match=r"fastgpt::triton_attention_fwd: head dim must be 16, 32, 64, 80, 96, "
                                           r"128 or 256, got 24"):
        triton_attention.attention_fwd(q, k, v, None, True, 0.2, 0.0, 0, 0, 0.0)
    q, k, v = make_qkv(1, 1, 8, 8, 16, device=device)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be bool \(B, Tk\) = \(1, 8\), got torch.bool \(1, 7\)"):
        triton_attention.attention_fwd(q, k, v, torch.ones(1, 7, dtype=torch.bool, device=device), True, 0.2, 0.0, 0, 0, 0.0)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="interpreter has no bfloat16 tl.dot"):
            triton_attention.attention_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, 0.2, 0.0, 0, 0, 0.0)
    x = torch.randn(4, 16, device=device)
    w = torch.ones(16, device=device)
    with pytest.raises(RuntimeError, match=r"fastgpt::triton_layer_norm_bwd: mean and rstd must be contiguous float32 "
                                           r"\(N,\) = \(4,\), got torch.float64"):
        triton_layer_norm.layer_norm_bwd(x, x, w, torch.zeros(4, dtype=torch.float64, device=device),
                                        torch.ones(4, device=device))


def test_torch_compile_fullgraph(device):
    import fastgpt

    def block(x, weight, bias, q, k, v):
        h = fastgpt.layer_norm(x, weight, bias, backend="triton")  # (B, T, C)
        out = fastgpt.attention(q, k, v, causal=True, backend="triton")  # (B, H, T, D)
        return h, out

    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 20, 48, generator=gen), torch.randn(48, generator=gen), torch.randn(48, generator=gen),
              *make_qkv(2, 2, 20, 20, 16)]
    eager_inputs = [t.to(device).requires_grad_() for t in inputs]
    compiled_inputs = [t.to(device).requires_grad_() for t in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    for fn, args in ((block, eager_inputs), (compiled, compiled_inputs)):
        h, out = fn(*args)
        (h.square().sum() + out.square().sum()).backward()
    for eager, traced in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(traced.grad, eager.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for got, want in zip(compiled(*compiled_inputs), block(*eager_inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- autotuning

def test_autotune_key_buckets_lengths(kernels):
    triton_attention, triton_layer_norm, launch = kernels
    assert [launch.length_bucket(T) for T in (1, 16, 17, 64, 65, 1000, 1024, 1025, 10**6)] == \
        [16, 16, 32, 64, 128, 1024, 1024, 2048, 16384]
    for kernel in (triton_attention._attention_fwd_kernel, triton_attention._attention_bwd_dkdv_kernel,
                   triton_attention._attention_bwd_dq_kernel):
        assert kernel.keys == ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL"]
    for kernel in (triton_layer_norm._layer_norm_fwd_kernel, triton_layer_norm._layer_norm_bwd_kernel):
        assert kernel.keys == ["C"]
    if launch.INTERPRET:  # one config each: the interpreter must not time candidates
        assert triton_attention._attention_fwd_kernel.configs == [triton_attention.FWD_INTERPRETER_CONFIG]
    else:
        assert triton_attention._attention_fwd_kernel.configs == [*triton_attention.FWD_CONFIGS[128],
                                                                  *triton_attention.FWD_CONFIGS[256]]


def test_autotune_candidates_are_pruned_to_the_lengths(kernels):
    triton_attention, triton_layer_norm, _ = kernels
    for by_head_dim in (triton_attention.FWD_CONFIGS, triton_attention.DKDV_CONFIGS, triton_attention.DQ_CONFIGS):
        prune = triton_attention._pruner(by_head_dim)
        every = [*by_head_dim[128], *by_head_dim[256]]
        for D, padded in ((16, 128), (80, 128), (96, 128), (128, 128), (256, 256)):  # 80, 96 run 128 wide
            decode = prune(every, {}, Q_BUCKET=16, K_BUCKET=1024, HEAD_DIM=D)
            assert decode and all(c.kwargs["BLOCK_M"] == 16 and any(c is w for w in by_head_dim[padded])
                                  for c in decode)
            long = prune(every, {}, Q_BUCKET=4096, K_BUCKET=4096, HEAD_DIM=D)
            assert [id(c) for c in long] == [id(c) for c in by_head_dim[padded]]
    tiny = triton_attention._pruner(triton_attention.DQ_CONFIGS)(
        [*triton_attention.DQ_CONFIGS[128], *triton_attention.DQ_CONFIGS[256]], {}, Q_BUCKET=16, K_BUCKET=16,
        HEAD_DIM=64)
    assert len(tiny) == 1 and tiny[0] is triton_attention.DQ_CONFIGS[128][-1]  # nothing fits: the smallest tile
    wide = triton_layer_norm._prune_to_width(triton_layer_norm.FWD_CONFIGS, {"BLOCK_C": 8192})
    assert wide and all(c.kwargs["BLOCK_R"] == 1 for c in wide)
    gpt2_xl = triton_layer_norm._prune_to_width(triton_layer_norm.BWD_CONFIGS, {}, BLOCK_C=2048)  # C = 1600
    assert [c.kwargs["BLOCK_R"] for c in gpt2_xl] == [1, 2, 4]
    gpt2 = triton_layer_norm._prune_to_width(triton_layer_norm.BWD_CONFIGS, {}, BLOCK_C=1024)  # C = 768
    assert gpt2 == triton_layer_norm.BWD_CONFIGS


def test_spilling_candidates_are_pruned_before_benchmarking(kernels):
    # _launch.spill_free_pruner on a stand-in kernel whose "compiled" candidates spill by BLOCK_M.
    launch = kernels[2]
    spills = {16: 0, 32: 40, 64: 0, 128: 12}
    compiled_calls = []

    class Compiled:
        def __init__(self, n_spills):
            self.n_spills = n_spills

        def _init_handles(self):
            pass

    class Kernel:
        def warmup(self, grid, **kwargs):
            compiled_calls.append((grid, kwargs))
            return Compiled(spills[kwargs["BLOCK_M"]])

    configs = [launch.config(4, 3, BLOCK_M=m) for m in spills]
    assert launch.spill_free_pruner(Kernel())(configs, {"x_ptr": "x"}, HEAD_DIM=64) == [configs[0], configs[2]]
    grid, arguments = compiled_calls[0]  # compiled for the call's own arguments, with the candidate's meta
    assert grid == (1,) and arguments["x_ptr"] == "x" and arguments["HEAD_DIM"] == 64
    assert arguments["BLOCK_M"] == 16 and arguments["num_warps"] == 4 and arguments["num_stages"] == 3
    # The kernel's own pruning first; when every candidate left spills, the ones that spill least.
    odd = launch.spill_free_pruner(Kernel(), lambda configs, named_args, **kwargs: configs[1::2])
    assert odd(configs, {}, HEAD_DIM=64) == [configs[3]]
    compiled_calls.clear()
    assert launch.spill_free_pruner(Kernel())(configs[1:2], {}) == configs[1:2] and not compiled_calls
    # A candidate that cannot launch at all (too much shared memory) goes first, even before spilling ones.
    from triton.runtime.errors import OutOfResources

    def too_big():
        raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")

    spills[32] = 0
    Compiled._init_handles = lambda self: too_big() if self.n_spills == 0 and compiled_calls[-1][1]["BLOCK_M"] == 16 \
        else None
    assert launch.spill_free_pruner(Kernel())(configs, {}) == [configs[1], configs[2]]


@pytest.mark.skipif(not HAS_GPU, reason="under the interpreter the kernels have one config and no pruning")
def test_every_autotuned_kernel_prunes_spilling_candidates(kernels):
    from fastgpt.triton import attention_decode, rms_norm
    triton_attention, triton_layer_norm, _ = kernels
    for tuner in (triton_attention._attention_fwd_kernel, triton_attention._attention_bwd_dkdv_kernel,
                  triton_attention._attention_bwd_dq_kernel, attention_decode._attention_decode_kernel,
                  triton_layer_norm._layer_norm_fwd_kernel, triton_layer_norm._layer_norm_bwd_kernel,
                  rms_norm._rms_norm_fwd_kernel, rms_norm._rms_norm_bwd_kernel):
        assert "spill_free_pruner" in tuner.early_config_prune.__qualname__, tuner.fn.__name__


@pytest.mark.skipif(not HAS_GPU, reason="the interpreter runs one config: nothing is tuned or cached")
def test_autotune_caches_one_config_per_bucket(device, kernels):
    import fastgpt.triton
    kernel = kernels[0]._attention_fwd_kernel

    def run(Tq, Tk):
        q, k, v = make_qkv(1, 2, Tq, Tk, 64, dtype=torch.float16, device=device)
        fastgpt.triton.attention.attention(q, k, v, True, None, 0.0, 0.125, 0)
        return {key[:4] for key in kernel.cache}  # (Q_BUCKET, K_BUCKET, HEAD_DIM, CAUSAL), then dtypes

    for T in (300, 400, 512):
        tuned = run(T, T)
    assert (512, 512, 64, True) in tuned and not any(key[0] in (300, 400) for key in tuned)
    assert (1024, 1024, 64, True) in run(600, 600)
    assert (16, 1024, 64, True) in run(1, 600)  # decoding one token against a KV cache
    assert kernel.best_config.kwargs["BLOCK_M"] == 16


# ----------------------------------------------------------------------------- layer norm reduction

@pytest.mark.parametrize("dtype,C", [(torch.float32, 768), (torch.float16, 100)])
@pytest.mark.parametrize("rows_per_group", [2, 40])
def test_layer_norm_weight_grads_with_a_short_last_group(device, kernels, dtype, C, rows_per_group):
    triton_layer_norm = kernels[1]
    target = triton_layer_norm._target_groups(torch.device(device))
    # About `rows_per_group` rows per group, N chosen so that the last group is shorter than the
    # others (with 40 rows per group the row loop inside a group also ends on a partial block).
    N = next(n for n in range(target * rows_per_group - target // 2, 10**6)
             if n % triton_layer_norm.row_groups(n, torch.device(device))[0] != 0)
    rows_per_group, num_groups = triton_layer_norm.row_groups(N, torch.device(device))
    assert num_groups > 1 and N % rows_per_group != 0
    gen = torch.Generator().manual_seed(N)
    x = (torch.randn(N, C, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(C, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(C, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad_y = torch.randn(N, C, generator=gen).to(device)
    import fastgpt.triton
    fastgpt.triton.layer_norm.layer_norm(x, w, b, 1e-5).backward(grad_y.to(dtype))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    reference.layer_norm(x64, w64, b64).backward(grad_y.double())
    baseline = [None] * 3
    if dtype != torch.float32:
        xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
        reference.layer_norm(xs, ws, bs).backward(grad_y.to(dtype))
        baseline = [xs.grad, ws.grad, bs.grad]
    for name, got, want, same in zip(("grad_x", "grad_weight", "grad_bias"), (x.grad, w.grad, b.grad),
                                     (x64.grad, w64.grad, b64.grad), baseline):
        assert got.dtype == dtype
        assert_close(got, want, same, what=name)


# ----------------------------------------------------------------------------- offsets past 2^31

OFFSETS_PAST_INT32_SCRIPT = textwrap.dedent("""
    # Runs every kernel under the interpreter on views whose element offsets pass 2^31 while little
    # memory is used: the views live in one large torch.empty buffer (virtual memory; only the pages
    # of the few elements in use are ever touched). argv[1] names the layout:
    #   rows:    row stride 2^24, 160 rows: a tile's first row (start 128+) times the stride passes
    #            2^31 -- int64 in the kernels (`_advance`, rows64), so no copy is made;
    #   columns: column stride 150e6, 16 columns: an in-tile offset passes 2^31 -- the host copies
    #            these views (`_launch.int32_tile_offsets`), the kernels keep in-tile offsets int32.
    # Without either, int32 offsets wrap: wrong results or a crash (hence the subprocess).
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, "tests")
    import torch
    import fastgpt.triton
    from checks import assert_close, attention_oracle
    from fastgpt import reference

    ROW_STRIDE, COLUMN_STRIDE, T, D = 2**24, 150_000_000, 160, 16
    layout = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    if layout == "rows":  # tensor i of row r at r * ROW_STRIDE + D * i
        buffer = torch.empty(T * ROW_STRIDE + 8 * D, dtype=torch.float16)
        def view(i, rows, cols):
            return buffer.as_strided((rows, cols), (ROW_STRIDE, 1), D * i)
        # The key padding mask: one byte per row, in slot 6 of the row's 8 half-precision tensors.
        mask = buffer.view(torch.bool).as_strided((1, T), (0, 2 * ROW_STRIDE), 2 * 6 * D)
    else:  # tensor i of column c at c * COLUMN_STRIDE + T * i
        buffer = torch.empty(D * COLUMN_STRIDE + 8 * T, dtype=torch.float16)
        def view(i, rows, cols):
            return buffer.as_strided((rows, cols), (1, COLUMN_STRIDE), T * i)
        mask = torch.ones(1, T, dtype=torch.bool)
    mask.copy_(torch.rand(1, T, generator=gen) > 0.2)

    def filled(t):
        return t.copy_(torch.randn(t.shape, generator=gen))

    for Tq in (T, 4):  # the prefill kernels; the split-KV decode forward (Tq <= 16)
        q, k, v, grad_out = (filled(view(i, Tq if i in (0, 3) else T, D)) for i in range(4))
        q, k, v, grad_out = (t[None, None] for t in (q, k, v, grad_out))  # (1, 1, T, D)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fastgpt.triton.attention.attention(q, k, v, True, mask, 0.0, 0.25, 0)
        grads = torch.autograd.grad(fastgpt.triton.attention.attention(*leaves, True, mask, 0.0, 0.25, 0),
                                    leaves, grad_out)
        oracle, naive = attention_oracle(q, k, v, True, mask, scale=0.25)
        assert_close(out, oracle, naive, what=f"attention out Tq={Tq}")
        if Tq == T:  # the backward on views (the leaves' copies are contiguous: only grad_out is a view)
            got = fastgpt.triton.attention.attention_bwd(grad_out, q, k, v, out, fastgpt.triton.attention.attention_fwd(
                q, k, v, mask, True, 0.25, 0.0, 0, 0, 0.0)[1], mask, True, 0.25, 0.0, 0, 0, 0.0)
            for name, g, w in zip(("dq", "dk", "dv"), got, grads):
                assert_close(g, w.double(), w, what=f"attention {name}")
        print("attention ok", Tq, flush=True)

    x, grad_y, residual = (filled(view(i, T, D)) for i in range(3))  # (N, C) = (T, D) views
    weight, bias = (filled(view(3 + i, 1, D))[0] for i in range(2))  # (C,), the column stride
    for name, run, want in (
            ("layer_norm", lambda *a: fastgpt.triton.layer_norm.layer_norm(*a[:3], 1e-5),
             lambda *a: reference.layer_norm(*a[:3], 1e-5)),
            ("rms_norm", lambda *a: fastgpt.triton.rms_norm.add_rms_norm(a[0], a[3], a[1], 1e-6, 1.0)[0],
             lambda *a: reference.rms_norm(a[0] + a[3], a[1], 1e-6, 1.0))):
        inputs = (x, weight, bias, residual)
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = run(*leaves)
        got = torch.autograd.grad(y, leaves[:2], grad_y)
        for precision in (torch.float64, torch.float16):
            ref_leaves = [t.detach().to(precision).requires_grad_() for t in inputs]
            ref_y = want(*ref_leaves)
            ref_grads = torch.autograd.grad(ref_y, ref_leaves[:2], grad_y.to(precision))
            if precision == torch.float64:
                oracle = (ref_y.detach(), *ref_grads)
        for what, g, w, same in zip(("y", "dx", "dweight"), (y, *got), oracle, (ref_y, *ref_grads)):
            assert_close(g, w, same.detach(), what=f"{name} {what}")
        print(name, "ok", flush=True)
    print("offsets ok")
""")


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_views_with_offsets_past_int32(layout):
    # The kernels on views whose element offsets pass 2^31 (see the script): a first tile row times
    # the row stride, or an in-tile column index times the column stride.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", OFFSETS_PAST_INT32_SCRIPT, layout], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "offsets ok" in result.stdout, \
        f"exit {result.returncode}: {result.stdout[-2000:]} {result.stderr[-3000:]}"


# ----------------------------------------------------------------------------- GPU code generation

HOPPER_COMPILE_SCRIPT = textwrap.dedent("""
    # Compiles kernels for sm_90 with Triton's own compiler: no GPU needed. argv[1] is "kernels"
    # (every kernel, head dim 64 / 32) or a head dim (the attention kernels at that head dim).
    # Specialised as a real launch is (tools/gpu_resources.py: triton_source): pointers and strides
    # divisible by 16, unit strides constant, so shared memory is that of the vectorised, pipelined code.
    import sys
    import triton
    from triton.runtime.autotuner import Autotuner
    sys.path.insert(0, "tools")
    from gpu_resources import ARCHS, compile_triton
    from fastgpt.triton import attention as fa, layer_norm as ln

    def build(kernel, dtype, constexprs, num_warps, num_stages, config=None):
        # config: the autotuned kernel's candidate to build (default its first).
        if isinstance(kernel, Autotuner):
            config = config or kernel.configs[0]
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        constexprs = {**constexprs, **(config.kwargs if config else {})}
        usage = compile_triton(fn, dtype, constexprs, config.num_warps if config else num_warps,
                               config.num_stages if config else num_stages)
        # The most one block may opt in to; Triton refuses bigger kernels at launch.
        assert usage["smem"] <= ARCHS["sm_90"]["smem_per_block"], (fn.__name__, dtype, constexprs, config, usage)

    def head_dim(D):
        return dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D))  # the kernels' padded tile width

    ATTENTION = ((fa._attention_fwd_kernel, fa.FWD_CONFIGS, {}),
                 (fa._attention_bwd_dkdv_kernel, fa.DKDV_CONFIGS, dict(DQ_PASS=False)),
                 (fa._attention_bwd_dq_kernel, fa.DQ_CONFIGS, dict(DQ_PASS=True)))
    plain = dict(**head_dim(64), CAUSAL=True, HAS_KPM=False, kpm_ptr=None, HAS_DROPOUT=False, DOT_PRECISION="tf32",
                 SOFTCAP=False, WINDOW=False)
    # GQA (KV_GROUP is a runtime int), sliding window and softcap together with mask and dropout.
    every_feature = dict(**head_dim(32), CAUSAL=True, HAS_KPM=True, HAS_DROPOUT=True, DOT_PRECISION="ieee",
                         SOFTCAP=True, WINDOW=True)
    if sys.argv[1] == "kernels":
        for kernel, _, pass_ in ATTENTION:
            build(kernel, "bf16", {**plain, **pass_}, 4, 3)  # a GPT's call: no mask, no dropout
            build(kernel, "fp32", {**every_feature, **pass_}, 4, 3)
            build(kernel, "bf16", {**plain, **pass_, "CAUSAL": False, "SOFTCAP": True, "WINDOW": True}, 4, 3)
        build(fa._attention_bwd_delta_kernel, "bf16", dict(**head_dim(64), BLOCK_M=fa.DELTA_BLOCK_M), 4, 1)
        build(ln._layer_norm_fwd_kernel, "bf16", dict(BLOCK_C=1024), 4, 1)
        build(ln._layer_norm_bwd_kernel, "bf16", dict(BLOCK_C=1024), 4, 1)
        build(ln._sum_groups_kernel, "bf16", dict(BLOCK_G=ln.SUM_BLOCK_G, BLOCK_C=ln.SUM_BLOCK_C), 4, 1)
    else:
        D = int(sys.argv[1])
        for kernel, configs_by_head_dim, pass_ in ATTENTION:
            candidates = fa._head_dim_tiles(configs_by_head_dim, D)
            # Head dims past 128 get their own candidates: each must fit (bf16 and fp16 tiles take the
            # same bytes); the others share those of 128, which compile at 64 and 128 elsewhere.
            for config in candidates if D > 128 else candidates[:1]:
                build(kernel, "bf16", {**plain, **pass_, **head_dim(D)}, 0, 0, config)
            build(kernel, "fp16", {**every_feature, **pass_, **head_dim(D), "DOT_PRECISION": "tf32"}, 0, 0,
                  candidates[0])
        build(fa._attention_bwd_delta_kernel, "fp16", dict(**head_dim(D), BLOCK_M=fa.DELTA_BLOCK_M), 4, 1)
    print("compiled")
""")


def compile_for_hopper(what):
    """Runs HOPPER_COMPILE_SCRIPT for `what` in a process without TRITON_INTERPRET, so that
    @triton.jit builds real kernels."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE_SCRIPT, what], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_kernels_compile_for_hopper():
    # The interpreter accepts code that the GPU compiler may not, and has no bfloat16 tl.dot:
    # compile the bfloat16 kernels for sm_90 ahead of time.
    compile_for_hopper("kernels")


@pytest.mark.parametrize("D", [80, 96, 256])
def test_head_dims_compile_for_hopper(D):
    # 80 and 96: the masked 128-wide tiles, in bfloat16 and float16 (with every feature); 256: every
    # candidate config, whose shared memory must fit sm_90.
    compile_for_hopper(str(D))


# ----------------------------------------------------------------------------- split-KV decoding

# Calls with Tq <= DECODE_MAX_QUERIES take fastgpt/triton/attention_decode.py: a GQA group's query
# heads packed into the rows of one tile, the keys split into chunks (MIN_CHUNK = 32 keys under the
# interpreter, BLOCK_N 16) merged by log-sum-exp. With a few kv heads every cache below longer than a
# chunk takes cdiv(Tk, 32) splits (the plan fills 2 * 132 programs first), so Tk = 20 has one split,
# 64 and 96 divide the chunk, 77, 130 and 300 do not.

@pytest.fixture
def decode_calls(kernels, monkeypatch):
    """Records every launch of the two forwards through fastgpt::triton_attention_fwd: the number of
    splits of each decode launch (attention_decode_fwd's return) and the prefill kernel launches."""
    from fastgpt.triton import attention_decode
    triton_attention = kernels[0]
    calls = {"decode": [], "prefill": 0}
    decode_fwd = attention_decode.attention_decode_fwd

    def counting_decode(*args, **kwargs):
        calls["decode"].append(decode_fwd(*args, **kwargs))
        return calls["decode"][-1]

    class CountingPrefill:
        def __getitem__(self, grid):
            calls["prefill"] += 1
            return kernel[grid]

    kernel = triton_attention._attention_fwd_kernel
    monkeypatch.setattr(attention_decode, "attention_decode_fwd", counting_decode)
    monkeypatch.setattr(triton_attention, "_attention_fwd_kernel", CountingPrefill())
    return calls


# (B, Hq, Hkv, Tq, Tk, D, causal, key padding, dropout_p, window, softcap, splits expected)
DECODE_CASES = {
    "mha-tq1-padded": (2, 3, 3, 1, 77, 32, True, True, 0.0, 0, 0.0, 3),
    "gqa2-tq2": (2, 4, 2, 2, 64, 16, True, False, 0.0, 0, 0.0, 2),
    "gqa4-tq5-full-padded": (2, 8, 2, 5, 130, 64, False, True, 0.0, 0, 0.0, 5),
    "mqa-tq16": (1, 4, 1, 16, 300, 16, True, False, 0.0, 0, 0.0, 10),
    "gqa8-tq16-two-row-tiles": (1, 16, 2, 16, 96, 16, True, True, 0.0, 0, 0.0, 3),
    "gqa5-tq15-short-last-row-tile": (1, 10, 2, 15, 70, 16, True, True, 0.0, 0, 0.0, 3),
    # 150 rows: the second and third row tiles start mid-head (query 4, 8) and wrap into the next head.
    "gqa10-tq15-wrapping-row-tiles": (1, 20, 2, 15, 70, 16, True, True, 0.0, 0, 0.0, 3),
    "gqa10-tq15-wrapping-window": (1, 20, 2, 15, 90, 16, False, False, 0.0, 20, 0.0, 3),
    "short-cache-one-split": (2, 4, 2, 5, 20, 32, True, True, 0.0, 0, 0.0, 1),
    "more-queries-than-keys": (2, 4, 2, 16, 9, 16, True, False, 0.0, 0, 0.0, 1),
    "gqa2-causal-window": (2, 4, 2, 3, 200, 16, True, False, 0.0, 40, 0.0, 3),
    "mqa-full-window-padded": (2, 2, 1, 5, 150, 32, False, True, 0.0, 45, 0.0, 3),
    "gqa4-softcap": (1, 8, 2, 4, 100, 16, True, False, 0.0, 0, 3.0, 4),
    "gqa2-dropout-padded": (2, 4, 2, 2, 90, 16, True, True, 0.3, 0, 0.0, 3),
    "everything": (2, 4, 2, 7, 123, 16, False, True, 0.2, 30, 5.0, 3),
}


def cdiv(a, b):
    return -(-a // b)


def expected_splits(interpreter_splits, B, Hq, Hkv, Tq, Tk, D, window):
    """The splits of a decode call: the tabled count under the interpreter (chunks of 32 keys), the
    plan's own on a GPU (whose chunks of >= 256 keys leave these short caches one split)."""
    from fastgpt.triton import attention_decode as ad
    if ad._launch.INTERPRET:
        return interpreter_splits
    return ad.decode_plan(B, Hkv, Hq // Hkv, Tq, Tk, D, window, torch.device("cuda"))[2]


def decode_inputs(case, dtype, device):
    B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap, _ = DECODE_CASES[case]
    q, k, v = make_qkv(B, Hq, Tq, Tk, D, dtype=dtype, device=device, generator_seed=Tk)
    k, v = k[:, :Hkv], v[:, :Hkv]  # views into the wider head stacks: strided kv heads
    mask = padding_mask(B, Tk, device=device, fully_masked_row=B > 1) if masked else None
    return q, k, v, mask


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter warns on any 1/0, log(0), inf - inf
@pytest.mark.parametrize("case,dtype", [(case, torch.float32) for case in DECODE_CASES]
                         + [(case, torch.float16) for case in ("gqa4-tq5-full-padded", "mqa-tq16",
                                                               "gqa2-causal-window", "everything")])
def test_decode_forward_and_lse_match_the_oracle(device, decode_calls, case, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap, splits = DECODE_CASES[case]
    q, k, v, mask = decode_inputs(case, dtype, device)
    scale, seed = 0.3, 4321
    out, lse = fastgpt_triton_attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap)
    assert decode_calls == {"decode": [expected_splits(splits, B, Hq, Hkv, Tq, Tk, D, window)], "prefill": 0}
    options = dict(window=window or None, softcap=softcap or None)
    oracle, naive = attention_oracle(q, k, v, causal, mask, dropout_p, scale, seed, **options)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, oracle, naive)
    want = reference.attention_lse(q.double(), k.double(), causal, mask, scale, **options)
    assert lse.shape == (B, Hq, Tq) and lse.dtype == torch.float32 and lse.is_contiguous()
    no_key = torch.isneginf(want)
    assert torch.equal(torch.isneginf(lse), no_key) and not torch.isnan(lse).any()
    assert (out[no_key] == 0).all()
    if masked and B > 1:
        assert no_key[0].all()  # batch 0 sees no key at all: zeros, lse -inf, through the merge
    # lse is float32 arithmetic on exactly representable inputs: the float32 rule holds for float16 too.
    err, tol = (lse[~no_key].double() - want[~no_key]).abs().max().item(), tolerance(torch.float32, want[~no_key], None)
    assert err <= tol, f"lse: max abs err {err:.3e} > tol {tol:.3e}"


def fastgpt_triton_attention_fwd(*args):
    import fastgpt.triton
    return fastgpt.triton.attention.attention_fwd(*args)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case,tiles", [("gqa2-causal-window", 1), ("mqa-full-window-padded", 1),
                                        ("everything", 1), ("gqa8-tq16-two-row-tiles", 4)])
def test_decode_with_a_forced_chunk_matches_the_prefill_kernel_and_the_oracle(device, kernels, case, tiles):
    # Chunks of one key tile (the largest BLOCK_N; 16 under the interpreter) make windows straddle
    # chunks and give splits that see nothing of a window (weight 0 in the merge); 4 tiles per chunk
    # the plain case. The result must be the prefill kernel's (same lse: the backward is shared) and
    # the oracle's.
    from fastgpt.triton import attention_decode
    chunk = tiles * attention_decode.MAX_BLOCK_N
    triton_attention = kernels[0]
    B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap, _ = DECODE_CASES[case]
    q, k, v, mask = decode_inputs(case, torch.float32, device)
    scale, seed = 0.25, 99
    pointers, strides, scalars = triton_attention._launch_args("test", q, k, v, mask, causal, scale, dropout_p,
                                                               seed, window, softcap)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=device)
    splits = attention_decode.attention_decode_fwd(pointers, strides, scalars, out, lse, chunk=chunk)
    span = min(Tk, Tq + window - 1) if window else Tk
    assert splits == min(cdiv(span, chunk) + (span < Tk), cdiv(Tk, chunk))
    assert splits > 1 or not attention_decode._launch.INTERPRET
    prefill_out = torch.empty_like(out)
    prefill_lse = torch.empty_like(lse)
    triton_attention._attention_fwd_kernel[lambda meta: (cdiv(Tq, meta["BLOCK_M"]), B * Hq)](
        *pointers, prefill_out, prefill_lse, *strides, **scalars)
    options = dict(window=window or None, softcap=softcap or None)
    assert_close(out, attention_oracle(q, k, v, causal, mask, dropout_p, scale, seed, **options)[0])
    assert_close(out, prefill_out)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(prefill_lse))
    finite = ~torch.isneginf(lse)
    torch.testing.assert_close(lse[finite], prefill_lse[finite], rtol=0, atol=1e-5)


def test_decode_path_is_taken_up_to_the_bound_only(device, decode_calls):
    from fastgpt import backends
    for Tq, decode, prefill in ((backends.DECODE_MAX_QUERIES, 1, 0), (backends.DECODE_MAX_QUERIES + 1, 1, 1)):
        q, k, v = make_qkv(1, 4, Tq, 50, 16, device=device)
        out, _ = fastgpt_triton_attention_fwd(q, k[:, :2], v[:, :2], None, True, 0.25, 0.0, 0, 0, 0.0)
        assert len(decode_calls["decode"]) == decode and decode_calls["prefill"] == prefill, Tq
        assert_close(out, attention_oracle(q, k[:, :2], v[:, :2], True, None, 0.0, 0.25)[0])


def test_decode_dropout_through_the_public_api_is_the_reference_mask(device, decode_calls):
    import fastgpt
    from fastgpt.ops import _draw_seed
    q, k, v = make_qkv(2, 4, 3, 70, 32, device=device)
    k, v = k[:, :2], v[:, :2]
    mask = padding_mask(2, 70, device=device)
    torch.manual_seed(5)
    seed = _draw_seed()  # what fastgpt.attention draws after torch.manual_seed(5)
    torch.manual_seed(5)
    out = fastgpt.attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=0.4, window=50, softcap=4.0,
                            backend="triton")
    assert decode_calls["decode"] == [expected_splits(3, 2, 4, 2, 3, 70, 32, 50)]
    assert_close(out, attention_oracle(q, k, v, True, mask, 0.4, None, seed, window=50, softcap=4.0)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_backward_matches_the_oracle(device, decode_calls, dtype):
    # The backward recomputes from the decode forward's out and lse: both must be the prefill's.
    q, k, v = make_qkv(2, 4, 5, 90, 32, dtype=dtype, device=device, generator_seed=2)
    k, v = k[:, :2], v[:, :2]
    mask = padding_mask(2, 90, device=device)  # batch 0 sees no key: zero gradients there
    got, oracle, naive = attention_and_grads(q, k, v, True, mask, dropout_p=0.2, seed=77, naive_baseline=True,
                                             window=40, softcap=3.0)
    assert decode_calls["decode"] == [expected_splits(3, 2, 4, 2, 5, 90, 32, 40)] and decode_calls["prefill"] == 0
    assert_all_close(got, oracle, naive)
    assert (got[1][0] == 0).all() and (got[2][0] == 0).all() and (got[3][0] == 0).all()


def test_decode_plan(kernels):
    from fastgpt.triton import attention_decode as ad
    cpu = torch.device("cpu")
    chunk = ad.MIN_CHUNK
    # (B, Hkv, KV_GROUP, Tq, Tk, D, window) -> (BLOCK_M, row tiles, splits, CHUNK)
    assert ad.decode_plan(1, 2, 4, 1, chunk - 1, 64, 0, cpu) == (16, 1, 1, ad._launch.length_bucket(chunk - 1))
    assert ad.decode_plan(1, 2, 4, 1, 10 * chunk + 1, 64, 0, cpu) == (16, 1, 11, chunk)
    assert ad.decode_plan(1, 2, 8, 16, 10 * chunk, 64, 0, cpu) == (64, 2, 10, chunk)  # 128 rows: 2 tiles
    assert ad.decode_plan(1, 2, 2, 16, 10 * chunk, 256, 0, cpu)[:2] == (16, 2)  # head dim 256: 16 rows a tile
    # Enough kv heads to fill the GPU on their own: one split, no merge.
    assert ad.decode_plan(ad.PROGRAMS_PER_SM * ad.ASSUMED_SMS, 1, 1, 1, 100 * chunk, 64, 0, cpu)[2] == 1
    # Long caches: splits to fill PROGRAMS_PER_SM * SMs programs, a power-of-two chunk, every key covered.
    block_m, tiles, splits, size = ad.decode_plan(2, 4, 4, 1, 1000 * chunk + 3, 64, 0, cpu)
    assert size & (size - 1) == 0 and size >= chunk and splits * size >= 1000 * chunk + 3
    assert (splits - 1) * size < 1000 * chunk + 3 and 2 * 4 * splits <= 2 * ad.PROGRAMS_PER_SM * ad.ASSUMED_SMS
    # A window: only its span counts, plus a chunk for straddling the grid.
    assert ad.decode_plan(1, 2, 4, 1, 100 * chunk, 64, 3 * chunk, cpu)[2] == 4
    with pytest.raises(ValueError, match="power of two"):
        ad.decode_plan(1, 2, 4, 1, 100, 64, 0, cpu, chunk=3 * ad.MAX_BLOCK_N)


def test_decode_autotune_key_and_pruning(kernels):
    from fastgpt.triton import attention_decode as ad
    kernel = ad._attention_decode_kernel
    assert kernel.keys == ["BLOCK_M", "CHUNK", "HEAD_DIM", "SPLIT"]
    if ad._launch.INTERPRET:
        assert kernel.configs == [ad.INTERPRETER_CONFIG]
    every = [*ad.DECODE_CONFIGS[128], *ad.DECODE_CONFIGS[256]]

    def pruned(**args):
        return [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in ad._prune(every, {}, **args)]

    assert pruned(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, CHUNK=256) == [(64, 4, 2), (64, 4, 3), (128, 4, 2)]
    assert pruned(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, CHUNK=256) == [(64, 4, 2), (64, 4, 3)]
    assert pruned(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=32, CHUNK=256) == [(64, 4, 2), (64, 4, 3), (128, 4, 2)]
    assert pruned(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=16, CHUNK=64) == [(64, 4, 2), (64, 4, 3)]
    assert pruned(HEAD_DIM=96, BLOCK_D=128, BLOCK_M=16, CHUNK=16) == [(64, 4, 2)]  # nothing fits: the smallest
    got = ad._prune(every, {}, HEAD_DIM=256, BLOCK_D=256, BLOCK_M=16, CHUNK=512)
    assert [id(c) for c in got] == [id(c) for c in ad.DECODE_CONFIGS[256]]


DECODE_HOPPER_SCRIPT = textwrap.dedent("""
    # Compiles the decode kernels' GPU configs for sm_90 (no GPU needed), specialised as a real launch
    # is (tools/gpu_resources.py: triton_source). Prints registers, spills and shared memory per build.
    import sys
    import triton
    sys.path.insert(0, "tools")
    from gpu_resources import ARCHS, compile_triton
    from fastgpt.triton import attention_decode as ad

    def build(fn, dtype, constexprs, num_warps, num_stages, spill_free):
        usage = compile_triton(fn, dtype, constexprs, num_warps, num_stages)
        what = {k: constexprs[k] for k in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "SPLIT", "HAS_DROPOUT") if k in constexprs}
        print(f"{fn.__name__} {dtype} {what} warps={num_warps} stages={num_stages}: regs={usage['registers']} "
              f"spill stores={usage['spill_stores']} shared={usage['smem']}")
        assert usage["smem"] <= ARCHS["sm_90"]["smem_per_block"], (fn.__name__, what, usage["smem"])
        assert not spill_free or usage["spill_stores"] == 0, (fn.__name__, what, "spills", usage["spill_stores"])

    kernel = ad._attention_decode_kernel.fn
    plain = dict(CAUSAL=True, HAS_KPM=False, kpm_ptr=None, HAS_DROPOUT=False, SOFTCAP=False, WINDOW=False,
                 DOT_PRECISION="tf32", SPLIT=True)
    every_feature = dict(CAUSAL=False, HAS_KPM=True, HAS_DROPOUT=True, SOFTCAP=True, WINDOW=True,
                         DOT_PRECISION="tf32", SPLIT=False)

    def tile(D, BLOCK_M):
        return dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BLOCK_M)

    # Every candidate next to the largest q tile that the host and the pruner give it.
    for padded, configs in ad.DECODE_CONFIGS.items():
        for config in configs:
            largest_m = min(ad.MAX_ROWS_PER_TILE[padded], ad.WIDE_KEY_TILE_MAX_ELEMENTS // padded) \\
                if config.kwargs["BLOCK_N"] > 64 else ad.MAX_ROWS_PER_TILE[padded]
            shapes = [(padded, largest_m)]
            if config.kwargs["BLOCK_N"] > 64 and padded == 128:
                shapes.append((64, ad.WIDE_KEY_TILE_MAX_ELEMENTS // 64))  # the same elements, half as wide
            for D, BLOCK_M in shapes:
                build(kernel, "bf16", {**plain, **tile(D, BLOCK_M), **config.kwargs}, config.num_warps,
                      config.num_stages, spill_free=True)
    first = ad.DECODE_CONFIGS[128][0]
    build(kernel, "fp16", {**every_feature, **tile(128, 64), **first.kwargs}, first.num_warps, first.num_stages,
          spill_free=False)
    for D in (128, 256):
        build(ad._attention_decode_merge_kernel, "bf16", dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=ad.MERGE_BLOCK_M),
              4, 1, spill_free=True)
    print("compiled")
""")


def test_decode_kernels_compile_for_hopper():
    # Registers, spills and shared memory of every decode config for sm_90 (printed; see -s): the
    # header's claim that the kept configs do not spill and fit sm_90's shared memory.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", DECODE_HOPPER_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
