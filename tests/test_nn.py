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
