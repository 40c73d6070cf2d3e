"""fastgpt.nn: the drop-in LayerNorm / MultiHeadAttention / CausalAttention (patch() is tests/test_patch.py).

The oracle for a module is the same module of the book (tests/book_model.py), or
torch.nn.LayerNorm, holding the same weights and run in float64.
"""
import copy

import pytest
import torch
from torch import nn

import book_model as book
import fastgpt
from checks import assert_close, float64_copy
from conftest import require_backend
from fastgpt import reference

# ---------------------------------------------------------------- LayerNorm

def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every parameter (ones / zeros would hide a swapped weight and bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.1)
    return module


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}],
                         ids=["default", "no-bias", "no-affine", "eps"])
def test_layer_norm_is_torch_layer_norm(backend, kwargs):
    theirs = randomise(nn.LayerNorm(48, **kwargs))
    ours = fastgpt.nn.LayerNorm(48, backend=backend, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 48)
    assert_close(ours(x), float64_copy(theirs)(x.double()))


def test_layer_norm_gradients_match_torch(backend):
    theirs = randomise(nn.LayerNorm(32)).double()
    ours = fastgpt.nn.LayerNorm(32, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 32)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    grad = torch.randn(4, 32)
    ours(x32).backward(grad)
    theirs(x64).backward(grad.double())
    assert_close(x32.grad, x64.grad, what="grad x")
    assert_close(ours.weight.grad, theirs.weight.grad, what="grad weight")
    assert_close(ours.bias.grad, theirs.bias.grad, what="grad bias")


@pytest.mark.parametrize("shape", [16, (16,), [16], torch.Size([16])])
def test_layer_norm_takes_torch_normalized_shapes(shape):
    ln = fastgpt.nn.LayerNorm(shape, dtype=torch.float64)
    assert ln.normalized_shape == (16,) and ln.weight.dtype == torch.float64
    assert ln(torch.randn(2, 16, dtype=torch.float64)).shape == (2, 16)


def test_layer_norm_refuses_several_dims():
    with pytest.raises(ValueError, match="last dim only.*torch.nn.LayerNorm"):
        fastgpt.nn.LayerNorm((4, 16))


def test_layer_norm_checks_input_width():
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 16\)"):
        fastgpt.nn.LayerNorm(16)(torch.randn(2, 8))


def test_layer_norm_loads_book_scale_shift(backend):
    theirs = randomise(book.LayerNorm(24))
    ours = fastgpt.nn.LayerNorm(24, backend=backend)
    ours.load_state_dict(theirs.state_dict())  # strict: scale/shift land in weight/bias
    assert torch.equal(ours.weight, theirs.scale) and torch.equal(ours.bias, theirs.shift)
    x = torch.randn(6, 24)
    assert_close(ours(x), float64_copy(theirs)(x.double()))


# ---------------------------------------------------------------- attention modules

def book_mha(qkv_bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return book.MultiHeadAttention(d_in=40, d_out=64, context_length=16, dropout=dropout, num_heads=4,
                                   qkv_bias=qkv_bias)


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no-bias", "bias"])
def test_multi_head_attention_equals_the_books(backend, fused_qkv, qkv_bias):
    theirs = book_mha(qkv_bias)
    ours = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, qkv_bias, backend=backend, fused_qkv=fused_qkv)
    ours.load_state_dict(theirs.state_dict())  # strict: the book's `mask` buffer is accepted and ignored
    x = torch.randn(3, 11, 40)
    oracle = float64_copy(theirs).eval()(x.double())
    assert_close(ours.eval()(x), oracle, what="eval")
    assert_close(ours.train()(x), oracle, what="train mode, dropout 0")


def test_multi_head_attention_gradients_equal_the_books(backend):
    theirs = book_mha().double()
    ours = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, True, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 40)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    ours(x32).square().sum().backward()
    theirs(x64).square().sum().backward()
    assert_close(x32.grad, x64.grad, what="grad x")
    for name in ("W_query", "W_key", "W_value", "out_proj"):
        assert_close(getattr(ours, name).weight.grad, getattr(theirs, name).weight.grad, what=f"grad {name}")


@pytest.mark.parametrize("name", ["naive", "cpu"])
def test_multi_head_attention_drops_attention_weights_in_training(name):
    """Dropout acts on the attention weights with the kernels' Philox mask, seeded from torch's RNG."""
    require_backend(name)
    p = 0.3
    ours = fastgpt.nn.MultiHeadAttention(40, 64, 16, p, 4, True, backend=name).train()
    x = torch.randn(2, 10, 40)
    torch.manual_seed(7)
    got = ours(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))  # how fastgpt.attention draws its seed
    with torch.no_grad():
        as64 = float64_copy(ours)
        q, k, v = (w(x.double()).view(2, 10, 4, 16).transpose(1, 2) for w in (as64.W_query, as64.W_key, as64.W_value))
        context = reference.attention(q, k, v, True, None, p, None, seed)  # (2, 4, 10, 16)
        want = as64.out_proj(context.transpose(1, 2).reshape(2, 10, 64))
    assert_close(got, want)
    assert (got - ours.eval()(x)).abs().max() > 0.01, "dropout changed nothing in training mode"


def test_multi_head_attention_state_dict_is_the_books_without_mask():
    ours = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.1, 4, qkv_bias=True)
    assert set(ours.state_dict()) == set(book_mha().state_dict()) - {"mask"}
    assert list(ours.buffers()) == []  # no T×T buffer


def test_fused_qkv_converts_both_ways(backend):
    theirs = book_mha()
    fused = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, True, backend=backend, fused_qkv=True)
    fused.load_state_dict(theirs.state_dict())
    assert {k for k in fused.state_dict() if k.startswith("W_")} == {"W_qkv.weight", "W_qkv.bias"}
    assert torch.equal(fused.W_qkv.weight, torch.cat([theirs.W_query.weight, theirs.W_key.weight,
                                                      theirs.W_value.weight]))
    separate = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, True, backend=backend)
    separate.load_state_dict(fused.state_dict())  # W_qkv split on load
    back_in_the_book = book.MultiHeadAttention(40, 64, 16, 0.0, 4, qkv_bias=True)
    result = back_in_the_book.load_state_dict(fastgpt.nn.unfuse_qkv(fused.state_dict()), strict=False)
    assert result.missing_keys == ["mask"] and result.unexpected_keys == []
    x = torch.randn(2, 7, 40)
    oracle = float64_copy(theirs)(x.double())
    for module in (fused, separate, back_in_the_book):
        assert_close(module(x), oracle, what=type(module).__name__)


def test_causal_attention_equals_the_books(backend):
    torch.manual_seed(1)
    theirs = book.CausalAttention(d_in=24, d_out=32, context_length=12, dropout=0.0, qkv_bias=False)
    ours = fastgpt.nn.CausalAttention(24, 32, 12, 0.0, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12, 24)
    assert_close(ours(x), float64_copy(theirs)(x.double()))


def test_modules_refuse_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.nn.MultiHeadAttention(8, 8, 4, 0.0, 1, backend="fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.nn.LayerNorm(8, backend="fast")


def test_attention_checks_heads_divide_d_out():
    with pytest.raises(ValueError, match=r"d_out \(10\) must be divisible by num_heads \(4\)"):
        fastgpt.nn.MultiHeadAttention(8, 10, 4, 0.0, 4)


# ---------------------------------------------------------------- the book's names, both ways

@pytest.mark.parametrize("fused_qkv", [False, True], ids=["separate", "fused"])
def test_to_book_state_dict_loads_strictly_into_the_books_modules(fused_qkv):
    """MultiHeadAttention, CausalAttention and LayerNorm, alone and nested: their state_dicts
    in the book's names load strictly into the book's classes and compute the same."""
    model = nn.ModuleDict({
        "att": fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, True, backend="naive", fused_qkv=fused_qkv),
        "head": fastgpt.nn.CausalAttention(40, 24, 16, 0.0, backend="naive", fused_qkv=fused_qkv),
        "norm": fastgpt.nn.LayerNorm(40, backend="naive"),
    })
    randomise(model, seed=3)
    converted = fastgpt.nn.to_book_state_dict(model, context_length=16)
    assert {k for k in converted if k.startswith("norm.")} == {"norm.scale", "norm.shift"}
    assert not any("W_qkv" in k for k in converted)
    mask = torch.ones(16, 16).triu(diagonal=1)
    assert torch.equal(converted["att.mask"], mask) and torch.equal(converted["head.mask"], mask)
    theirs = nn.ModuleDict({"att": book.MultiHeadAttention(40, 64, 16, 0.0, 4, qkv_bias=True),
                            "head": book.CausalAttention(40, 24, 16, 0.0),
                            "norm": book.LayerNorm(40)})
    result = theirs.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 9, 40)
    for name in ("att", "head", "norm"):
        assert_close(model[name](x), float64_copy(theirs[name])(x.double()), what=name)
    # And back: the book's state_dict loads strictly into the fastgpt modules, to the same weights.
    again = copy.deepcopy(model)
    randomise(again, seed=4)
    again.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_to_book_state_dict_renames_only_fastgpt_layer_norms():
    model = nn.Sequential(fastgpt.nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 8))
    converted = fastgpt.nn.to_book_state_dict(model)
    assert list(converted) == ["0.scale", "0.shift", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(converted["0.scale"], model[0].weight) and torch.equal(converted["1.weight"], model[1].weight)
    state = model.state_dict()
    given = {key: torch.zeros_like(value) for key, value in state.items()}  # an explicit state_dict is used
    assert torch.equal(fastgpt.nn.to_book_state_dict(model, given)["0.shift"], torch.zeros(8))


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("fused_qkv", [False, True], ids=["separate", "fused"])
def test_kv_cache_decoding_equals_the_full_forward(backend, fused_qkv):
    """Prefill 6 tokens, then one token at a time (Tq = 1 < Tk, bottom-right causal): the
    outputs are the full causal forward's, which is the book's module's."""
    theirs = book_mha()
    ours = fastgpt.nn.MultiHeadAttention(40, 64, 16, 0.0, 4, True, backend=backend, fused_qkv=fused_qkv).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 10, 40)
    cache = ours.new_kv_cache(batch_size=2, max_len=12)
    assert isinstance(cache, fastgpt.nn.KVCache) and cache.keys.shape == (2, 4, 12, 16) and cache.length == 0
    with torch.no_grad():
        steps = [ours(x[:, :6], cache)] + [ours(x[:, t:t + 1], kv_cache=cache) for t in range(6, 10)]
    assert cache.length == 10
    assert_close(torch.cat(steps, dim=1), float64_copy(theirs).eval()(x.double()), what="cached vs book")


def test_kv_cache_refuses_overflow_and_batch_mismatch():
    att = fastgpt.nn.MultiHeadAttention(16, 16, 8, 0.0, 1, backend="naive")
    cache = att.new_kv_cache(batch_size=1, max_len=4)
    att(torch.randn(1, 3, 16), cache)
    with pytest.raises(ValueError, match=r"holds batch 1 x 4 tokens; got batch 1 with 3 cached \+ 2 new"):
        att(torch.randn(1, 2, 16), cache)
    with pytest.raises(ValueError, match=r"holds batch 1 x 4 tokens; got batch 2 with 3 cached \+ 1 new"):
        att(torch.randn(2, 1, 16), cache)
    assert cache.length == 3  # a refused append leaves the cache as it was


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}],
                         ids=["default-eps", "eps", "no-affine"])
def test_rms_norm_is_torch_rms_norm(backend, kwargs):
    theirs = randomise(nn.RMSNorm(48, **kwargs))
    ours = fastgpt.nn.RMSNorm(48, backend=backend, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 48)
    assert ours.eps == theirs.eps == kwargs.get("eps")
    # eps=None is torch.finfo(x.dtype).eps: float32's for the float32 x (the float64 oracle says so explicitly)
    oracle = nn.RMSNorm(48, eps=kwargs.get("eps", torch.finfo(torch.float32).eps),
                        elementwise_affine=theirs.elementwise_affine, dtype=torch.float64)
    oracle.load_state_dict(theirs.state_dict())
    assert_close(ours(x), oracle(x.double()))


def test_rms_norm_gradients_match_torch(backend):
    theirs = randomise(nn.RMSNorm(32, eps=1e-6)).double()
    ours = fastgpt.nn.RMSNorm(32, eps=1e-6, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 32)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    grad = torch.randn(4, 32)
    ours(x32).backward(grad)
    theirs(x64).backward(grad.double())
    assert_close(x32.grad, x64.grad, what="grad x")
    assert_close(ours.weight.grad, theirs.weight.grad, what="grad weight")


def test_rms_norm_offset_is_gemmas_one_plus_weight(backend):
    """offset=1: weight starts at zeros (the identity scale) and the output is x̂ · (1 + w)."""
    ours = fastgpt.nn.RMSNorm(24, eps=1e-6, offset=1.0, backend=backend)
    assert torch.equal(ours.weight, torch.zeros(24)) and torch.equal(fastgpt.nn.RMSNorm(24).weight, torch.ones(24))
    x = torch.randn(2, 7, 24)
    assert_close(ours(x), reference.rms_norm(x.double(), None, 1e-6), what="zeros with offset 1: no scale")
    randomise(ours)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + ours.weight.double())
    assert_close(ours(x), want, what="x̂ (1 + w)")


def test_rms_norm_loads_book_scale_and_fuses_the_residual_add(backend):
    ours = fastgpt.nn.RMSNorm(16, eps=1e-6, backend=backend)
    scale = torch.randn(16)
    ours.load_state_dict({"scale": scale})  # the book's Qwen 3 / Gemma 3 RMSNorm: `scale`
    assert torch.equal(ours.weight, scale)
    x, residual = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    normed, total = ours.forward_add(x, residual)
    assert torch.equal(total, x + residual)
    assert_close(normed, reference.rms_norm((x + residual).double(), scale.double(), 1e-6))


def test_rms_norm_refuses_bad_shapes_and_backends():
    with pytest.raises(ValueError, match="last dim only.*torch.nn.RMSNorm"):
        fastgpt.nn.RMSNorm((4, 16))
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 16\)"):
        fastgpt.nn.RMSNorm(16)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.nn.RMSNorm(8, backend="fast")


# ---------------------------------------------------------------- grouped-query attention, RoPE, QK-norm

def gqa_oracle(att, x, cos=None, sin=None):
    """The book's GroupedQueryAttention written out in float64: project, QK-norm, RoPE, repeat
    k / v per group (repeat_interleave), scaled scores (softcap), causal (+ window) mask, softmax."""
    m = float64_copy(att)
    B, T, _ = x.shape
    x = x.double()
    q = m.W_query(x).view(B, T, att.num_heads, att.head_dim).transpose(1, 2)
    k = m.W_key(x).view(B, T, att.num_kv_groups, att.head_dim).transpose(1, 2)
    v = m.W_value(x).view(B, T, att.num_kv_groups, att.head_dim).transpose(1, 2)
    if att.q_norm is not None:
        q = reference.rms_norm(q, m.q_norm.weight, att.q_norm.eps, att.q_norm.offset)
        k = reference.rms_norm(k, m.k_norm.weight, att.k_norm.eps, att.k_norm.offset)
    if cos is not None:
        def rotate(t):
            half = att.head_dim // 2
            return t * cos.double() + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin.double()
        q, k = rotate(q), rotate(k)
    group = att.num_heads // att.num_kv_groups
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(2, 3) * (att.head_dim ** -0.5 if att.scale is None else att.scale)
    if att.softcap is not None:
        scores = att.softcap * torch.tanh(scores / att.softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    hidden = (j > i) | ((i - j >= att.window) if att.window is not None else False)
    context = torch.softmax(scores.masked_fill(hidden, -torch.inf), dim=-1) @ v
    return m.out_proj(context.transpose(1, 2).reshape(B, T, -1))


def rope_tables(T, D, base=10_000.0):
    from fastgpt.models.blocks import compute_rope_params

    return compute_rope_params(D, base, T)


GQA_CASES = {
    "gqa": dict(num_kv_groups=2),
    "mqa-head_dim-qk_norm": dict(num_kv_groups=1, head_dim=32, qk_norm=True),
    "gemma": dict(num_kv_groups=1, head_dim=32, qk_norm=True, norm_offset=1.0, query_pre_attn_scalar=24, window=5),
    "softcap-window": dict(num_kv_groups=4, window=3, softcap=2.0),
}


@pytest.mark.parametrize("case", list(GQA_CASES))
def test_grouped_query_attention_equals_the_books_formula(backend, case):
    att = randomise(fastgpt.nn.GroupedQueryAttention(40, 4, backend=backend, **GQA_CASES[case]), seed=2).eval()
    assert att.W_key.weight.shape == (att.num_kv_groups * att.head_dim, 40) and att.out_proj.out_features == 40
    assert att.out_proj.bias is None and att.W_query.bias is None
    x = torch.randn(2, 12, 40)
    cos, sin = rope_tables(12, att.head_dim)
    assert_close(att(x, rope=(cos, sin)), gqa_oracle(att, x, cos, sin), what=f"{case} with RoPE")
    assert_close(att(x), gqa_oracle(att, x), what=f"{case} without RoPE")


def test_grouped_query_attention_kv_cache_holds_kv_heads(backend):
    """Prefill 7 tokens, then one at a time with their RoPE rows: the cache holds num_kv_groups
    heads, and the outputs are the full forward's (the window keeps to the last 5 keys)."""
    att = randomise(fastgpt.nn.GroupedQueryAttention(40, 4, 1, head_dim=32, qk_norm=True, window=5,
                                                     backend=backend), seed=3).eval()
    x = torch.randn(2, 12, 40)
    cos, sin = rope_tables(12, 32)
    cache = att.new_kv_cache(batch_size=2, max_len=12)
    assert cache.keys.shape == (2, 1, 12, 32)
    with torch.no_grad():
        steps = [att(x[:, :7], cache, rope=(cos[:7], sin[:7]))]
        steps += [att(x[:, t:t + 1], cache, rope=(cos[t:t + 1], sin[t:t + 1])) for t in range(7, 12)]
    assert_close(torch.cat(steps, dim=1), gqa_oracle(att, x, cos, sin), what="cached GQA")


def test_multi_head_attention_takes_the_gqa_options():
    """One attention class: MultiHeadAttention with num_kv_groups / head_dim is the same module."""
    mha = fastgpt.nn.MultiHeadAttention(40, 40, 16, 0.0, 4, backend="naive", num_kv_groups=2, head_dim=8,
                                        out_bias=False)
    gqa = fastgpt.nn.GroupedQueryAttention(40, 4, 2, head_dim=8, backend="naive")
    assert {k: v.shape for k, v in mha.state_dict().items()} == {k: v.shape for k, v in gqa.state_dict().items()}
    assert isinstance(gqa, type(mha).__mro__[1]) and "num_kv_groups=2, head_dim=8" in repr(gqa)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_groups \(3\)"):
        fastgpt.nn.GroupedQueryAttention(40, 4, 3)
    with pytest.raises(ValueError, match=r"d_in \(42\) must be divisible by num_heads \(4\)"):
        fastgpt.nn.GroupedQueryAttention(42, 4, 2)


def test_fused_grouped_query_attention_converts_both_ways():
    separate = randomise(fastgpt.nn.GroupedQueryAttention(40, 4, 2, head_dim=16, backend="naive"), seed=4)
    fused = fastgpt.nn.GroupedQueryAttention(40, 4, 2, head_dim=16, backend="naive", fused_qkv=True)
    fused.load_state_dict(separate.state_dict())
    assert fused.W_qkv.weight.shape == (64 + 32 + 32, 40)
    back = fastgpt.nn.GroupedQueryAttention(40, 4, 2, head_dim=16, backend="naive")
    back.load_state_dict(fused.state_dict())
    book_names = fastgpt.nn.to_book_state_dict(fused)
    assert book_names["W_key.weight"].shape == (32, 40) and "W_qkv.weight" not in book_names
    x = torch.randn(2, 6, 40)
    for module in (fused, back):
        assert_close(module(x), gqa_oracle(separate, x), what="fused / split back")


@pytest.mark.parametrize("variant", ["qwen3", "gemma3-sliding", "gemma3-global"])
def test_grouped_query_attention_loads_and_equals_the_books(backend, variant):
    """The book's Qwen 3 / Gemma 3 GroupedQueryAttention (tests/book_modern.py): its state_dict
    (q_norm.scale, k_norm.scale) loads strictly, and with the same RoPE tables the outputs agree
    with the book's masked matmul attention (Gemma: sliding-window mask <-> window=5)."""
    import book_modern

    gemma = variant.startswith("gemma3")
    window = 5 if variant == "gemma3-sliding" else None
    torch.manual_seed(6)
    if gemma:
        theirs = book_modern.GemmaGroupedQueryAttention(40, 4, 1, head_dim=32, qk_norm=True, query_pre_attn_scalar=24)
        ours = fastgpt.nn.GroupedQueryAttention(40, 4, 1, head_dim=32, qk_norm=True, query_pre_attn_scalar=24,
                                                norm_offset=1.0, window=window, backend=backend)
    else:
        theirs = book_modern.GroupedQueryAttention(40, 4, 2, head_dim=16, qk_norm=True)
        ours = fastgpt.nn.GroupedQueryAttention(40, 4, 2, head_dim=16, qk_norm=True, backend=backend)
    randomise(theirs, seed=7)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    T = 12
    cos, sin = book_modern.compute_rope_params(ours.head_dim, 10_000, T)
    mask = book_modern.sliding_mask(T, 5) if window else book_modern.causal_mask(T)
    x = torch.randn(2, T, 40)
    assert_close(ours(x, rope=(cos, sin)), float64_copy(theirs)(x.double(), mask, cos.double(), sin.double()))
