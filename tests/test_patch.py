"""fastgpt.patch: swapping the book's modules (and torch's, and HF's) for fastgpt.nn's in place.

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
