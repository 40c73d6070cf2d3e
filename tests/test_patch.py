"""fastgpt.patch / unpatch: swapping the book's modules (and torch's, and HF's) for fastgpt.nn's
in place, only where nothing computed changes, and putting the originals back.

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

def randomise(modules, seed: int = 0) -> None:
    """Non-trivial values for the modules' parameters: layer norms start at scale 1, shift 0,
    which would hide a swap of the two."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for module in modules for p in module.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.1)


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (book.LayerNorm, nn.LayerNorm))]


def book_gpt(kind=book.GPTModel, **overrides):
    torch.manual_seed(0)
    model = kind(book.tiny_config(**overrides))
    randomise(norms(model))
    return model.eval()


def count_calls(monkeypatch, name):
    """Records the backend of each call of fastgpt.ops.<name> (fastgpt.nn's modules call fastgpt.ops.*)."""
    calls = []
    original = getattr(fastgpt.ops, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fastgpt.ops, name, spy)
    return calls


def training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


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
    calls = count_calls(monkeypatch, "attention")
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


def hf_gpt2(attn_implementation=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    randomise(norms(model))
    return model


def test_patch_hugging_face_gpt2_swaps_layer_norms_only(backend):
    model = hf_gpt2()
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


def test_patch_lists_a_hugging_face_attention_that_already_runs_fastgpt():
    pytest.importorskip("transformers")
    import fastgpt.hf

    implementation = fastgpt.hf.register(backend="naive", name="fastgpt-naive")
    report = fastgpt.patch(hf_gpt2(implementation), backend="naive")
    assert len(report.swapped) == 5 and report.left == []
    assert report.native == [(f"transformer.h.{i}.attn", "transformers.models.gpt2.modeling_gpt2.GPT2Attention",
                              "runs fastgpt.attention: attn_implementation='fastgpt-naive'") for i in range(2)]


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


class MHAEinsum(nn.Module):
    """The bonus notebook's einsum attention keeps W_query/W_key/W_value as bare Parameters."""

    def __init__(self, d):
        super().__init__()
        self.W_query, self.W_key, self.W_value = (nn.Parameter(torch.randn(d, d)) for _ in range(3))


class ResettableMHA(book.MultiHeadAttention):
    """The book's forward, plus a method callers rely on that fastgpt's module does not have."""

    def reset_cache(self):
        pass


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.multi_dim_norm = nn.LayerNorm((4, 16))
        self.torch_mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.rms = RMSNormNamedLayerNorm(16)
        self.bidirectional = BidirectionalMHA(16, 16, 8, 0.0, 2)
        self.plain = SelfAttentionV2(16, 16)
        self.einsum = MHAEinsum(16)
        self.resettable = ResettableMHA(16, 16, 8, 0.0, 2)
        self.unknown = type("LinearAttention", (nn.Module,), {})()
        self.subclassed = type("FP32LayerNorm", (nn.LayerNorm,), {})(16)
        self.linear = nn.Linear(16, 16)


def test_patch_leaves_what_it_cannot_swap_and_says_why():
    model = Odd()
    modules_before = {name: id(m) for name, m in model.named_modules()}
    report = fastgpt.patch(model)
    assert report.swapped == [] and report.retargeted == [] and report.native == []
    reasons = {name: reason for name, _, reason in report.left}
    assert set(reasons) == {"multi_dim_norm", "torch_mha", "rms", "bidirectional", "plain", "einsum",
                            "resettable", "unknown", "subclassed"}
    assert "fastgpt normalises over the last dim only" in reasons["multi_dim_norm"]
    assert "torch.nn.MultiheadAttention is not supported" in reasons["torch_mha"]
    assert "not a layer norm over the last dim: on a probe input" in reasons["rms"]
    assert "not the book's causal attention: on a probe input" in reasons["bidirectional"]
    assert "dropout" in reasons["plain"]
    assert "W_query / W_key / W_value are not all nn.Linear" in reasons["einsum"]
    assert "it has methods fastgpt's module lacks: reset_cache" in reasons["resettable"]
    assert "does not recognise its structure" in reasons["unknown"]
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
    assert text.splitlines()[0] == "swapped 7, backend set on 0, already fastgpt 0, left 0"
    assert "swapped  trf_blocks.0.att: book_model.MultiHeadAttention -> fastgpt.nn.MultiHeadAttention" in text


def test_patched_book_gpt_loads_the_books_state_dict(backend):
    model, trained = book_gpt(), book_gpt()
    randomise([trained], seed=5)
    fastgpt.patch(model, backend=backend)
    model.load_state_dict(trained.state_dict())  # strict: scale/shift renamed, mask buffers ignored
    idx = torch.randint(0, 97, (2, 12))
    assert_close(model(idx), float64_copy(trained)(idx))


# ---------------------------------------------------------------- training flags and dropout

def test_patch_in_eval_mode_changes_no_logit_and_no_generated_token(backend):
    # Dropout 0.1 everywhere: a swapped module (or a shared Linear / Dropout) left in training
    # mode would drop activations in a model the user put in eval mode.
    model = book_gpt(drop_rate=0.1)
    unpatched = copy.deepcopy(model)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    fastgpt.patch(model, backend=backend)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unpatched(idx), atol=1e-5, rtol=0)
    prompt = idx[:, :4]
    assert torch.equal(book.generate_text_simple(model, prompt, 12, 32),
                       book.generate_text_simple(unpatched, prompt, 12, 32))


def test_patch_keeps_every_training_flag_dropout_rate_and_the_global_rng():
    model = book_gpt(drop_rate=0.1).train()
    model.trf_blocks[1].eval()  # mixed flags: each module keeps its own
    flags = training_flags(model)
    rng = torch.get_rng_state()
    report = fastgpt.patch(model, backend="naive")
    assert len(report.swapped) == 7
    assert training_flags(model) == flags
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert torch.equal(torch.get_rng_state(), rng)


class TrainingOnlyBidirectional(BidirectionalMHA):
    """The book's causal attention in eval mode, bidirectional while training."""

    def forward(self, x):
        return super().forward(x) if self.training else book.MultiHeadAttention.forward(self, x)


def test_patch_probes_train_mode_too():
    model = nn.Sequential(TrainingOnlyBidirectional(16, 16, 8, 0.1, 2)).eval()
    report = fastgpt.patch(model, backend="naive")
    assert report.swapped == []
    assert "(train mode, dropout off) its output differs" in report.left[0][2]
    assert model[0].dropout.p == 0.1 and not model[0].training


# ---------------------------------------------------------------- forwards fastgpt's cannot stand in for

def test_patch_swaps_the_kv_cache_attention_and_generation_is_unchanged(backend):
    model = book_gpt(book.GPTModelWithKVCache)
    unpatched = copy.deepcopy(model)
    report = fastgpt.patch(model, backend=backend)
    assert [(name, new) for name, _, new in report.swapped] == [
        (f"trf_blocks.{i}.{module}", kind) for i in range(2) for module, kind in (
            ("att", "fastgpt.patch.BookCachedAttention"), ("norm1", "fastgpt.nn.LayerNorm"),
            ("norm2", "fastgpt.nn.LayerNorm"))] + [("final_norm", "fastgpt.nn.LayerNorm")]
    assert report.left == []
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(book.generate_text_simple_cached(model, prompt, 12),
                       book.generate_text_simple_cached(unpatched, prompt, 12))


class SlidingWindowMHA(book.MultiHeadAttention):
    """The book's attention that also hides keys more than `window` tokens back: equal to the
    book's on any sequence up to `window` tokens, different beyond."""

    window = 16

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        hidden = self.mask.bool()[:t, :t] | torch.ones(t, t, dtype=torch.bool).tril(-self.window)
        weights = torch.softmax((q @ k.transpose(2, 3)).masked_fill(hidden, -torch.inf) / self.head_dim ** 0.5, -1)
        return self.out_proj(self.dropout(weights).matmul(v).transpose(1, 2).reshape(b, t, self.d_out))


def test_patch_probes_the_whole_context_and_leaves_a_hidden_window():
    torch.manual_seed(0)
    windowed = SlidingWindowMHA(16, 16, 48, 0.0, 2)
    short = torch.randn(2, 16, 16)
    book_twin = book.MultiHeadAttention(16, 16, 48, 0.0, 2)
    book_twin.load_state_dict(windowed.state_dict())
    torch.testing.assert_close(windowed(short), book_twin(short))  # what a short probe alone would see
    model = nn.Sequential(windowed)
    report = fastgpt.patch(model, backend="naive")
    assert report.swapped == [] and model[0] is windowed
    assert "on a probe input of 48 tokens (eval mode) its output differs" in report.left[0][2]


# ---------------------------------------------------------------- fused qkv layouts

FUSED = {
    "combined-qkv": lambda dropout: book.MultiHeadAttentionCombinedQKV(32, 32, 2, 24, dropout, qkv_bias=True),
    "sdpa": lambda dropout: book.MHAPyTorchScaledDotProduct(32, 32, 2, 24, dropout, qkv_bias=True),
    "gpt-model-fast": lambda dropout: book.PyTorchMultiHeadAttention(32, 32, 2, dropout, qkv_bias=True),
}


@pytest.mark.parametrize("kind", FUSED)
def test_patch_swaps_the_books_fused_qkv_attentions(backend, kind):
    torch.manual_seed(0)
    attention = FUSED[kind](0.1)
    model = nn.Sequential(attention).eval()
    x = torch.randn(2, 24, 32)
    oracle = float64_copy(model)(x.double())
    report = fastgpt.patch(model, backend=backend)
    assert report.swapped == [("0", f"book_model.{type(attention).__name__}", "fastgpt.nn.MultiHeadAttention")]
    fused = model[0]
    assert fused.W_qkv is attention.qkv and fused.out_proj is attention.proj
    assert fused.dropout.p == 0.1 and not fused.training
    assert_close(model(x), oracle)


class HeadInterleavedQKV(book.MultiHeadAttentionCombinedQKV):
    """qkv rows read as (num_heads, 3, head_dim), not the book's (3, num_heads, head_dim)."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
                                / self.head_dim ** 0.5, dim=-1)
        return self.proj(self.dropout(weights).matmul(v).transpose(1, 2).reshape(b, t, -1))


def test_patch_leaves_a_fused_qkv_of_another_row_order():
    model = nn.Sequential(HeadInterleavedQKV(32, 32, 2, 24))
    report = fastgpt.patch(model, backend="naive")
    assert report.swapped == []
    assert "not a causal attention on the book's fused qkv: on a probe input" in report.left[0][2]


def test_patch_gpt_model_fast_keeps_its_logits(backend):
    model = book_gpt(book.GPTModelFast, drop_rate=0.1)
    idx = torch.randint(0, 97, (2, 20))
    oracle = float64_copy(model)(idx)
    report = fastgpt.patch(model, backend=backend)
    assert len(report.swapped) == 7 and report.left == []
    assert_close(model(idx), oracle)


# ---------------------------------------------------------------- unpatch

def test_unpatch_round_trip_through_the_books_state_dict(backend, tmp_path):
    """Chapter 5's loop: train the patched model, save its state_dict, load it into the book's class."""
    model = book_gpt(drop_rate=0.1).train()
    originals = {name: id(m) for name, m in model.named_modules()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before the patch: shared Parameters
    before = copy.deepcopy(model.state_dict())
    fastgpt.patch(model, backend=backend)
    batch = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    model.eval()  # reaches the fastgpt modules only: the originals must take their flags back with them
    report = fastgpt.unpatch(model)
    assert len(report.restored) == 7
    assert {name: id(m) for name, m in model.named_modules()} == originals
    assert not any(m.training for m in model.modules())
    assert all(not torch.equal(before[name], value) for name, value in model.state_dict().items()
               if name.endswith((".scale", ".weight")))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    fresh = book.GPTModel(book.tiny_config(drop_rate=0.1))
    fresh.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), fresh(batch))


def test_unpatch_after_patching_twice_restores_the_true_originals():
    model = book_gpt()
    originals = {name: id(m) for name, m in model.named_modules()}
    first = fastgpt.patch(model, backend="sdpa")
    fastgpt.patch(model, backend="naive")
    report = fastgpt.unpatch(model)
    assert [name for name, _, _ in report.restored] == [name for name, _, _ in first.swapped]
    assert report.restored[0] == ("trf_blocks.0.att", "fastgpt.nn.MultiHeadAttention", "book_model.MultiHeadAttention")
    assert {name: id(m) for name, m in model.named_modules()} == originals
    assert fastgpt.unpatch(model).restored == [] and first.restore().restored == []


def test_report_restore_undoes_that_patch_and_unpatch_of_an_unpatched_model_is_a_no_op():
    model = book_gpt()
    originals = {name: id(m) for name, m in model.named_modules()}
    assert str(fastgpt.unpatch(model)) == "restored 0"
    assert {name: id(m) for name, m in model.named_modules()} == originals
    report = fastgpt.patch(model, backend="naive")
    text = str(report.restore())
    assert text.splitlines()[0] == "restored 7"
    assert "restored final_norm: fastgpt.nn.LayerNorm -> book_model.LayerNorm" in text
    assert {name: id(m) for name, m in model.named_modules()} == originals


def test_unpatch_brings_the_originals_buffers_to_the_models_dtype():
    model = book_gpt()
    fastgpt.patch(model, backend="naive")
    model.double()  # after the patch: reaches the shared Parameters, not the originals' mask buffers
    fastgpt.unpatch(model)
    assert {value.dtype for value in model.state_dict().values()} == {torch.float64}
    fresh = book.GPTModel(book.tiny_config()).double()
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_patch_a_meta_device_model_by_structure():
    with torch.device("meta"):
        model = book.GPTModel(book.tiny_config())
    report = fastgpt.patch(model, backend="naive")
    assert len(report.swapped) == 7
    assert {p.device.type for p in model.parameters()} == {"meta"}
