"""fastgpt.nn: the drop-in LayerNorm / MultiHeadAttention / CausalAttention, and patch().

The oracle for a module is the same module of the book (tests/book_model.py), or
torch.nn.LayerNorm, holding the same weights and run in float64.
"""
import copy

import pytest
import torch
from torch import nn

import book_model as book
import fastgpt
from checks import assert_close
from conftest import require_backend
from fastgpt import reference

BACKENDS = ("naive", "sdpa", "cpu")


@pytest.fixture(params=BACKENDS, ids=lambda b: f"backend={b}")
def backend(request):
    require_backend(request.param)
    return request.param


def float64_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


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


# ---------------------------------------------------------------- patch()

def book_gpt(**overrides):
    torch.manual_seed(0)
    model = book.GPTModel(book.tiny_config(**overrides))
    randomise_norms(model)
    return model.eval()


def randomise_norms(model: nn.Module) -> None:
    """Layer norms start at scale 1, shift 0: randomise them so a swap of the two would show."""
    for i, module in enumerate(m for m in model.modules() if isinstance(m, (book.LayerNorm, nn.LayerNorm))):
        randomise(module, seed=i)


def count_calls(monkeypatch, name, namespace=fastgpt.ops):
    """Records the backend of each call of namespace.<name> (fastgpt.nn's modules call fastgpt.ops.*)."""
    calls = []
    original = getattr(namespace, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(namespace, name, spy)
    return calls


def test_patch_book_gpt_keeps_outputs_and_parameters(backend, monkeypatch):
    model = book_gpt()
    idx = torch.randint(0, 97, (2, 20))
    oracle = float64_copy(model)(idx)
    params = {name: p for name, p in model.named_parameters()}
    report = fastgpt.patch(model, backend=backend)
    assert [name for name, _, _ in report.swapped] == [
        "trf_blocks.0.att", "trf_blocks.0.norm1", "trf_blocks.0.norm2",
        "trf_blocks.1.att", "trf_blocks.1.norm1", "trf_blocks.1.norm2", "final_norm"]
    assert report.left == [] and report.retargeted == []
    assert isinstance(model.trf_blocks[0].att, fastgpt.nn.MultiHeadAttention)
    assert isinstance(model.final_norm, fastgpt.nn.LayerNorm)
    # The very same Parameter objects, under torch's names for the layer norms.
    renamed = {name.replace(".scale", ".weight").replace(".shift", ".bias"): p for name, p in params.items()}
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in renamed.items()}
    attention_calls, norm_calls = count_calls(monkeypatch, "attention"), count_calls(monkeypatch, "layer_norm")
    assert_close(model(idx), oracle)
    assert attention_calls == [backend] * 2 and norm_calls == [backend] * 5


def test_patch_twice_does_not_double_wrap(monkeypatch):
    model = book_gpt()
    fastgpt.patch(model, backend="sdpa")
    modules_before = {name: id(m) for name, m in model.named_modules()}
    report = fastgpt.patch(model, backend="naive")
    assert report.swapped == [] and report.left == []
    assert len(report.retargeted) == 7
    assert {name: id(m) for name, m in model.named_modules()} == modules_before
    calls = count_calls(monkeypatch, "attention")
    model(torch.randint(0, 97, (1, 8)))
    assert calls == ["naive", "naive"]


def test_patch_fastgpt_gpt_model_sets_its_backend(monkeypatch):
    torch.manual_seed(0)
    model = fastgpt.GPTModel(book.tiny_config(), backend="sdpa").eval()
    idx = torch.randint(0, 97, (2, 12))
    oracle = float64_copy(model)(idx)
    modules_before = {name: id(m) for name, m in model.named_modules()}
    report = fastgpt.patch(model, backend="naive")
    assert report.swapped == [] and report.left == []
    assert {name for name, _ in report.retargeted} == {
        "<root>", "final_norm", *(f"trf_blocks.{i}.{part}" for i in range(2) for part in ("att", "norm1", "norm2"))}
    assert {name: id(m) for name, m in model.named_modules()} == modules_before
    calls = count_calls(monkeypatch, "attention", fastgpt.model)
    assert_close(model(idx), oracle)
    assert calls == ["naive", "naive"]


def test_patch_book_multi_head_wrapper_swaps_each_head(backend):
    torch.manual_seed(2)
    wrapper = book.MultiHeadAttentionWrapper(d_in=16, d_out=16, context_length=8, dropout=0.0, num_heads=3)
    x = torch.randn(2, 8, 16)
    oracle = float64_copy(wrapper)(x.double())
    report = fastgpt.patch(wrapper, backend=backend)
    assert [(name, new) for name, _, new in report.swapped] == [
        (f"heads.{i}", "fastgpt.nn.CausalAttention") for i in range(3)]
    assert_close(wrapper(x), oracle)


def test_patch_hugging_face_gpt2_swaps_layer_norms_only(backend):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomise_norms(model)
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        oracle = float64_copy(model)(idx).logits
    report = fastgpt.patch(model, backend=backend)
    assert {name for name, _, _ in report.swapped} == {
        "transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
        "transformer.ln_f"}
    assert [(name, reason) for name, _, reason in report.left] == [
        (f"transformer.h.{i}.attn", "an attention module fastgpt does not recognise (a transformers model: use "
                                    "attn_implementation='fastgpt' after `import fastgpt.hf`)") for i in range(2)]
    with torch.no_grad():
        assert_close(model(idx).logits, oracle)


class RMSNormNamedLayerNorm(nn.Module):
    """Book-shaped (scale, shift, eps) but normalises by the RMS: patch must not swap it."""

    def __init__(self, dim):
        super().__init__()
        self.eps, self.scale, self.shift = 1e-5, nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale + self.shift


RMSNormNamedLayerNorm.__name__ = "LayerNorm"


class BidirectionalMHA(book.MultiHeadAttention):
    """The book's module with the mask left out of forward: looks causal, is not."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        weights = torch.softmax(q @ k.transpose(2, 3) / self.head_dim ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, self.d_out))


class SelfAttentionV2(nn.Module):
    """The book's chapter 3.4 SelfAttention_v2: W_query/W_key/W_value, no mask, no dropout."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=False) for _ in range(3))

    def forward(self, x):
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        return torch.softmax(q @ k.transpose(-2, -1) / k.shape[-1] ** 0.5, dim=-1) @ v


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.multi_dim_norm = nn.LayerNorm((4, 16))
        self.torch_mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.rms = RMSNormNamedLayerNorm(16)
        self.bidirectional = BidirectionalMHA(16, 16, 8, 0.0, 2)
        self.plain = SelfAttentionV2(16, 16)
        self.subclassed = type("FP32LayerNorm", (nn.LayerNorm,), {})(16)
        self.linear = nn.Linear(16, 16)


def test_patch_leaves_what_it_cannot_swap_and_says_why():
    model = Odd()
    modules_before = {name: id(m) for name, m in model.named_modules()}
    report = fastgpt.patch(model)
    assert report.swapped == [] and report.retargeted == []
    reasons = {name: reason for name, _, reason in report.left}
    assert set(reasons) == {"multi_dim_norm", "torch_mha", "rms", "bidirectional", "plain", "subclassed"}
    assert "fastgpt normalises over the last dim only" in reasons["multi_dim_norm"]
    assert "torch.nn.MultiheadAttention is not supported" in reasons["torch_mha"]
    assert "not a layer norm over the last dim: on a probe input" in reasons["rms"]
    assert "not the book's causal attention: on a probe input" in reasons["bidirectional"]
    assert "dropout" in reasons["plain"]
    assert "subclass of torch.nn.LayerNorm" in reasons["subclassed"]
    assert {name: id(m) for name, m in model.named_modules()} == modules_before


def test_patch_keeps_training_mode_dtype_and_device():
    model = book_gpt().double().train()
    fastgpt.patch(model, backend="naive")
    assert all(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.trf_blocks[0].norm1.weight.dtype == torch.float64


def test_patch_unknown_backend_changes_nothing():
    model = book_gpt()
    with pytest.raises(ValueError, match="unknown backend"):
        fastgpt.patch(model, backend="fast")
    assert isinstance(model.trf_blocks[0].att, book.MultiHeadAttention)


def test_patch_cannot_replace_the_root_and_says_so():
    norm = nn.LayerNorm(8)
    report = fastgpt.patch(norm)
    assert report.swapped == []
    assert report.left[0][0] == "<root>" and "cannot be replaced in place" in report.left[0][2]


def test_patch_report_prints_a_table():
    model = book_gpt()
    text = str(fastgpt.patch(model, backend="naive"))
    assert text.splitlines()[0] == "swapped 7, backend set on 0, left 0"
    assert "swapped  trf_blocks.0.att: book_model.MultiHeadAttention -> fastgpt.nn.MultiHeadAttention" in text


def test_patched_book_gpt_loads_the_books_state_dict(backend):
    model, trained = book_gpt(), book_gpt()
    randomise(trained, seed=5)
    fastgpt.patch(model, backend=backend)
    model.load_state_dict(trained.state_dict())  # strict: scale/shift renamed, mask buffers ignored
    idx = torch.randint(0, 97, (2, 12))
    assert_close(model(idx), float64_copy(trained)(idx))
