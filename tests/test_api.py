"""The public API's contract: every validation path, backend selection, info(), and the
naive / sdpa backends against the float64 oracle."""
import math

import pytest
import torch

import fastgpt
from fastgpt import backends, reference
from checks import assert_close, attention_oracle, make_qkv, padding_mask


def qkv(B=2, H=3, Tq=5, Tk=5, D=16, dtype=torch.float32):
    return make_qkv(B, H, Tq, Tk, D, dtype)


# ---- attention input validation: each message says what was expected -------------------

@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q[0], k, v), r"q must be 4-D \(B, Hq, Tq, D\), got shape \(3, 5, 16\)"),
    (lambda q, k, v: (q, k[..., 0], v), r"k must be 4-D \(B, Hkv, Tk, D\)"),
    (lambda q, k, v: (q, k, v[:, :, :4]), r"k and v must have the same shape"),
    (lambda q, k, v: (q[:1], k, v), r"must agree in B and D"),
    (lambda q, k, v: (q[:, :2], k, v), r"the query heads Hq must be a multiple of the key/value heads Hkv \(grouped-query attention\), got Hq = 2 and Hkv = 3"),
    (lambda q, k, v: (q[..., :8], k, v), r"must agree in B and D"),
    (lambda q, k, v: (q, k.half(), v.half()), r"must share one dtype"),
    (lambda q, k, v: (q.int(), k, v), r"q must be float16, bfloat16, float32 or float64 \(float64: naive, sdpa, cpu\), got torch.int32"),
    (lambda q, k, v: (q[:, :, :0], k, v), r"B, H, Tq, Tk and D must all be at least 1, got q \(2, 3, 0, 16\)"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta")), r"must be on one device"),
    (lambda q, k, v: (q.numpy(), k, v), r"q must be a torch.Tensor, got ndarray"),
])
def test_attention_rejects_bad_tensors(bad, message):
    q, k, v = bad(*qkv())
    with pytest.raises((ValueError, TypeError), match=message):
        fastgpt.attention(q, k, v, backend="naive")


@pytest.mark.parametrize("mask, message", [
    (torch.ones(2, 5), r"key_padding_mask must be a bool tensor \(B, Tk\) with True = keep, got torch.float32"),
    ([[True] * 5] * 2, r"key_padding_mask must be a bool tensor .* got list"),
    (torch.ones(2, 4, dtype=torch.bool), r"key_padding_mask must have shape \(B, Tk\) = \(2, 5\), got \(2, 4\)"),
    (torch.ones(5, 2, dtype=torch.bool), r"got \(5, 2\)"),
    (torch.ones(2, 5, dtype=torch.bool, device="meta"), r"key_padding_mask must be on cpu \(the device of q, k, v\), got meta"),
])
def test_attention_rejects_bad_mask(mask, message):
    with pytest.raises(ValueError, match=message):
        fastgpt.attention(*qkv(), key_padding_mask=mask, backend="naive")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", True, None])
def test_attention_rejects_bad_dropout(p):
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        fastgpt.attention(*qkv(), dropout_p=p, backend="naive")


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "0.5", True])
def test_attention_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number or None"):
        fastgpt.attention(*qkv(), scale=scale, backend="naive")


@pytest.mark.parametrize("window", [0, -3, 2.0, True, "8"])
def test_attention_rejects_bad_window(window):
    with pytest.raises(ValueError, match=r"fastgpt.attention: window must be an int >= 1 \(keys per query, itself "
                                         r"included\) or None, got "):
        fastgpt.attention(*qkv(), window=window, backend="naive")


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan"), True, "30"])
def test_attention_rejects_bad_softcap(softcap):
    with pytest.raises(ValueError, match=r"fastgpt.attention: softcap must be a positive finite number or None, got "):
        fastgpt.attention(*qkv(), softcap=softcap, backend="naive")


@pytest.mark.parametrize("kwargs, kv_heads, feature", [
    ({}, 1, r"grouped-query attention \(k, v with fewer heads than q\)"),
    ({"window": 4}, 3, "a sliding window"),
    ({"softcap": 30.0}, 3, "a logit softcap"),
])
def test_a_backend_without_a_feature_refuses_it_and_auto_falls_back(kwargs, kv_heads, feature, monkeypatch):
    q, k, v = qkv()
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    monkeypatch.setattr(backends.REGISTRY["cpu"], "features", frozenset())
    with pytest.raises(ValueError, match=rf"fastgpt.attention: backend='cpu' cannot run this call: {feature} is not "
                                         rf"implemented in this backend"):
        fastgpt.attention(q, k, v, backend="cpu", **kwargs)
    if fastgpt.info()["cpu"]["available"]:
        out = fastgpt.attention(q, k, v, **kwargs)  # auto: the next backend that has the feature
        assert_close(out, reference.attention(q.double(), k.double(), v.double(), True, None, 0.0, None, 0,
                                              kwargs.get("window"), kwargs.get("softcap")))


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'flash'; expected one of \('auto', 'naive', 'sdpa'"):
        fastgpt.attention(*qkv(), backend="flash")


def test_unavailable_backend_says_why():
    # CUDA kernels never run on CPU tensors: the error names the device and the reason.
    with pytest.raises(RuntimeError, match=r"fastgpt.attention: backend='cuda' cannot run this call: unavailable on cpu"):
        fastgpt.attention(*qkv(), backend="cuda")
    with pytest.raises(RuntimeError, match=r"fastgpt.layer_norm: backend='cuda' cannot run this call"):
        fastgpt.layer_norm(torch.randn(3, 8), None, None, backend="cuda")


def test_unsupported_head_dim_names_supported_set():
    fake = backends.Backend("fake", "test", (torch.float32,), (16, 32, 64, 128), {"cpu": None})
    backends.REGISTRY["fake"] = fake
    try:
        with pytest.raises(ValueError, match=r"head dim must be 16, 32, 64 or 128, got 48"):
            backends.select("fake", torch.device("cpu"), torch.float32, 48)
        with pytest.raises(ValueError, match=r"dtype must be float32, got float16"):
            backends.select("fake", torch.device("cpu"), torch.float16, 64)
    finally:
        del backends.REGISTRY["fake"]


def test_declared_refusals_word_the_error():
    # Triton's interpreter refuses bfloat16 attention: declared once (backends.REGISTRY), used by
    # select and by the Triton operators' own safety net.
    triton = backends.REGISTRY["triton"]
    assert any(r.op == "attention" and r.device_type == "cpu" and r.dtype == torch.bfloat16 for r in triton.refusals)
    why = backends.refusal(triton, "attention", torch.device("cpu"), torch.bfloat16, 64)
    if triton.why_not("cpu") is None:
        assert why == triton.refusals[0].reason
    assert backends.refusal("naive", "attention", torch.device("cpu"), torch.bfloat16, 64) is None


def test_dtypes_expected_come_from_the_registry():
    assert backends.ALL_DTYPES == (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    assert backends.dtypes_expected() == "float16, bfloat16, float32 or float64 (float64: naive, sdpa, cpu)"


def test_cpu_head_dim_limit_is_checked_before_the_kernel():
    with pytest.raises(ValueError, match=r"fastgpt.attention: backend='cpu' cannot run this call: head dim must be 1..256, got 300"):
        fastgpt.attention(*make_qkv(1, 1, 4, 4, 300), backend="cpu")


# ---- layer norm input validation ------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ((torch.randn(4, 8), torch.ones(7), None), r"weight must have shape \(C,\) = \(8,\) to match x \(4, 8\), got \(7,\)"),
    ((torch.randn(4, 8), None, torch.ones(2, 8)), r"bias must have shape \(C,\) = \(8,\)"),
    ((torch.randn(4, 0), None, None), r"x must have a non-empty last dim"),
    ((torch.tensor(1.0), None, None), r"x must have a non-empty last dim \(\.\.\., C\), got shape \(\)"),
    ((torch.ones(4, 8, dtype=torch.int64), None, None), r"x must be float16, bfloat16, float32 or float64 .*, got torch.int64"),
    ((torch.randn(4, 8), torch.ones(8, dtype=torch.int64), None), r"weight must be floating point"),
    ((torch.randn(4, 8), torch.ones(8, device="meta"), None), r"weight must be on cpu \(the device of x\), got meta"),
    (([1.0, 2.0], None, None), r"x must be a torch.Tensor, got list"),
    ((torch.randn(4, 8), "w", None), r"weight must be a tensor or None, got str"),
])
def test_layer_norm_rejects_bad_input(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fastgpt.layer_norm(*args, backend="naive")


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), float("nan"), "1e-5"])
def test_layer_norm_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        fastgpt.layer_norm(torch.randn(2, 4), None, None, eps=eps, backend="naive")


# ---- info() and auto selection --------------------------------------------------------------

def test_info_lists_every_backend_with_a_reason_when_missing():
    report = fastgpt.info()
    assert set(backends.NAMES) <= set(report)
    for name in backends.NAMES:
        entry = report[name]
        assert entry["available"] == bool(entry["devices"])
        if set(entry["devices"]) != set(backends.REGISTRY[name].unavailable):
            assert entry["reason"], f"{name} is missing somewhere but says no reason"
    assert report["naive"]["available"] and report["sdpa"]["available"]
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]
        assert "cuda" in report["cuda"]["reason"]


def test_auto_picks_the_first_usable_backend_in_order():
    picked = backends.select("auto", torch.device("cpu"), torch.float32, 64)
    first = next(n for n in backends.AUTO_ORDER["cpu"] if backends.REGISTRY[n].why_not("cpu") is None)
    assert picked.name == first == fastgpt.info()["auto"]["picks"]["cpu"]
    # a head dim the C++ kernels do not take falls back quietly to the next backend
    assert backends.select("auto", torch.device("cpu"), torch.float32, 300).name == "sdpa"


# ---- the reference and the naive / sdpa backends ------------------------------------------

def test_reference_matches_a_hand_computed_softmax():
    q = torch.tensor([[[[1.0, 0.0]], ]]).double()             # (1, 1, 1, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]).double()   # (1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).double()
    w = torch.softmax(torch.tensor([1.0, 0.0]).double() / math.sqrt(2), 0)
    expected = w[0] * v[0, 0, 0] + w[1] * v[0, 0, 1]
    out = reference.attention(q, k, v, causal=True)            # Tq=1 < Tk=2 sees both keys
    assert torch.allclose(out[0, 0, 0], expected)
    assert torch.allclose(reference.attention_lse(q, k)[0, 0, 0], torch.logsumexp(torch.tensor([1.0, 0.0]).double() / math.sqrt(2), 0))


def test_reference_causal_is_bottom_right_aligned():
    keep = reference.visible_keys(2, 4, True, None, "cpu")[0, 0]
    assert keep.tolist() == [[True, True, True, False], [True, True, True, True]]
    keep = reference.visible_keys(3, 2, True, None, "cpu")[0, 0]  # Tq > Tk: the first row sees nothing
    assert keep.tolist() == [[False, False], [True, False], [True, True]]


def test_reference_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = make_qkv(2, 2, 4, 6, 8, torch.float64, requires_grad=True)
    mask = padding_mask(2, 6)
    out = reference.attention(q, k, v, causal=False, key_padding_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_dropout_keep_rate_and_scaling():
    keep = reference.dropout_keep_mask(seed=7, B=2, H=3, Tq=64, Tk=64, dropout_p=0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1])  # each head has its own stream
    assert torch.equal(keep, reference.dropout_keep_mask(7, 2, 3, 64, 64, 0.25))
    assert not torch.equal(keep, reference.dropout_keep_mask(8, 2, 3, 64, 64, 0.25))


def test_reference_layer_norm_matches_torch():
    x = torch.randn(5, 33, dtype=torch.float64) * 3 + 2
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (33,), w, b))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 16), (1, 2, 5, 33, 32), (2, 2, 9, 4, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_backends_match_the_oracle(backend, dtype, shape, causal, masked):
    B, H, Tq, Tk, D = shape
    q, k, v = make_qkv(B, H, Tq, Tk, D, dtype)
    mask = padding_mask(B, Tk) if masked else None
    out = fastgpt.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    oracle, same = attention_oracle(q, k, v, causal, mask)
    assert out.dtype == dtype and out.shape == q.shape
    if backend == "naive":
        assert torch.equal(out, same)
    assert_close(out, oracle, same)


def test_reference_window_and_softcap_follow_their_definitions():
    """The oracle against a per-element loop over the contract's definitions (p = i + Tk - Tq)."""
    q, k, v = make_qkv(1, 4, 5, 9, 8, torch.float64)
    k, v = k[:, :2], v[:, :2]  # GQA: query head h reads kv head h // 2
    for causal in (True, False):
        for window in (1, 3, 20):
            out = reference.attention(q, k, v, causal, None, 0.0, 0.5, 0, window, 2.0)
            for h in range(4):
                for i in range(5):
                    p = i + 9 - 5
                    keys = [j for j in range(9) if (j <= p if causal else True)
                            and (p - window < j if causal else abs(j - p) < window)]
                    s = 2.0 * torch.tanh(0.5 * k[0, h // 2, keys] @ q[0, h, i] / 2.0)
                    want = torch.softmax(s, 0) @ v[0, h // 2, keys] if keys else torch.zeros(8, dtype=torch.float64)
                    torch.testing.assert_close(out[0, h, i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("kv_heads, window, softcap", [(1, None, None), (2, 3, None), (4, 6, None), (2, None, 5.0),
                                                       (1, 2, 3.0)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_torch_backends_run_gqa_windows_and_softcap(backend, kv_heads, window, softcap, causal):
    q, k, v = make_qkv(2, 4, 7, 11, 16)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    mask = padding_mask(2, 11)
    out = fastgpt.attention(q, k, v, causal=causal, key_padding_mask=mask, window=window, softcap=softcap,
                            backend=backend)
    oracle, same = attention_oracle(q, k, v, causal, mask, window=window, softcap=softcap)
    assert out.shape == q.shape
    assert_close(out, oracle, same)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_torch_backends_gradients_finite_with_fully_masked_rows(backend):
    q, k, v = make_qkv(2, 2, 5, 7, 16, requires_grad=True)
    mask = padding_mask(2, 7)
    out = fastgpt.attention(q, k, v, causal=True, key_padding_mask=mask, backend=backend)
    out.square().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(qd, kd, vd, True, mask).square().sum().backward()
    for got, want in ((q, qd), (k, kd), (v, vd)):
        assert_close(got.grad, want.grad, what="grad")


def test_naive_dropout_uses_the_philox_mask_and_the_torch_seed():
    q, k, v = make_qkv(1, 2, 8, 8, 16, torch.float64)
    torch.manual_seed(3)
    out = fastgpt.attention(q, k, v, dropout_p=0.5, backend="naive")
    torch.manual_seed(3)
    seed = fastgpt.ops._draw_seed()
    assert torch.equal(out, reference.attention(q, k, v, True, None, 0.5, None, seed))
    torch.manual_seed(3)
    assert torch.equal(out, fastgpt.attention(q, k, v, dropout_p=0.5, backend="naive"))
    assert not torch.equal(out, fastgpt.attention(q, k, v, dropout_p=0.5, backend="naive"))


def test_layer_norm_backends_and_autocast_style_params():
    x = torch.randn(3, 4, 40, dtype=torch.bfloat16)
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)  # float32 params
    for backend in ("naive", "sdpa"):
        y = fastgpt.layer_norm(x, w, b, backend=backend)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        want = reference.layer_norm(x.double(), w.double(), b.double())
        assert_close(y, want, reference.layer_norm(x, w.bfloat16(), b.bfloat16()))
        y.float().sum().backward()
        assert w.grad is not None and w.grad.dtype == torch.float32
        w.grad = b.grad = None
