"""patch() on the book's later modules (tests/book_modern.py): the RoPE attentions of its Llama 3,
Qwen 3 and Gemma 3 (forward(x, mask, cos, sin), sliding windows read off the mask), the KV-cache
attentions of ch04/04_gqa and ch04/06_swa (forward(x, use_cache), reset_cache()) and every RMSNorm
variant. Each swap must leave logits, gradients and cached generation as they were; what cannot
be reproduced is left with a reason.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastgpt
import book_modern as book
from conftest import require_backend

FAMILIES = ("llama3", "qwen3", "gemma3")
# The modules each tiny model has, by the class patch() swaps in.
ROPE_SWAPS = {  # family -> {fastgpt class: count}
    "llama3": {"fastgpt.patch.BookRopeAttention": 2, "fastgpt.nn.RMSNorm": 5},
    "qwen3": {"fastgpt.patch.BookRopeAttention": 2, "fastgpt.nn.RMSNorm": 5},
    "gemma3": {"fastgpt.patch.BookRopeAttention": 2, "fastgpt.nn.RMSNorm": 9},
}


@pytest.fixture(params=("auto", "cpu"), ids=lambda b: f"backend={b}")
def backend(request):
    if request.param != "auto":
        require_backend(request.param)
    return request.param


def randomised(model):
    """Weights away from their initial values (Gemma's zero norms, Qwen's ones) so that a wrong
    offset or a missing QK-norm shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def kinds(report):
    counts = {}
    for _, _, new in report.swapped:
        counts[new] = counts.get(new, 0) + 1
    return counts


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_models_are_swapped_exactly(family, backend):
    model = randomised(book.RopeModel(family))
    unpatched = copy.deepcopy(model)
    report = fastgpt.patch(model, backend=backend)
    assert kinds(report) == ROPE_SWAPS[family] and report.left == []
    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))  # 23 > the window of 5
    want = unpatched(idx)
    got = model(idx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # The same Parameters, so their gradients are comparable one to one.
    torch.autograd.backward(want.square().mean())
    torch.autograd.backward(got.square().mean())
    for (name, p), q in zip(model.named_parameters(), unpatched.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=name)
    fastgpt.unpatch(model)
    fresh = book.RopeModel(family)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert type(model.trf_blocks[0].att) is type(unpatched.trf_blocks[0].att)


def test_the_sliding_window_comes_from_the_mask_each_call(monkeypatch):
    """Gemma 3's local layers get the sliding mask, its global ones the causal mask: the window
    each fused call runs with is the mask's."""
    model = randomised(book.RopeModel("gemma3"))
    fastgpt.patch(model)
    windows = []
    original = fastgpt.ops.attention

    def spy(q, k, v, **kwargs):
        windows.append(kwargs["window"])
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fastgpt.ops, "attention", spy)
    model(torch.randint(0, 97, (1, 11)))
    model(torch.randint(0, 97, (1, 4)))  # shorter than the window: plain causal attention everywhere
    assert windows == [5, None, None, None]


def test_a_mask_that_is_not_causal_runs_the_original_with_a_warning():
    att = randomised(book.GroupedQueryAttention(64, 4, 2, 16, qk_norm=True))
    holder = nn.ModuleDict({"att": copy.deepcopy(att)})
    fastgpt.patch(holder)
    assert type(holder["att"]).__name__ == "BookRopeAttention"
    x = torch.randn(2, 9, 64)
    cos, sin = book.compute_rope_params(16, context_length=9)
    bidirectional = torch.zeros(9, 9, dtype=torch.bool)
    bidirectional[:, 7] = True  # a padding-like column: no causal structure
    with pytest.warns(RuntimeWarning, match="not causal with a sliding window; such calls run the original"):
        got = holder["att"](x, bidirectional, cos, sin)
    torch.testing.assert_close(got, att(x, bidirectional, cos, sin), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the causal mask runs fused, without a warning
        torch.testing.assert_close(holder["att"](x, book.causal_mask(9), cos, sin),
                                   att(x, book.causal_mask(9), cos, sin), atol=2e-5, rtol=0)


@pytest.mark.parametrize("T, window, expected", [(6, None, (True, None)), (6, 3, (True, 3)), (6, 6, (True, None)),
                                                 (1, 4, (True, None))])
def test_mask_window_reads_causal_and_sliding_masks(T, window, expected):
    from fastgpt.patch import _mask_window
    mask = book.causal_mask(T) if window is None else book.sliding_mask(T, window)
    assert _mask_window(mask, T) == expected
    assert _mask_window(mask[None, None], T) == expected  # (1, 1, T, T) broadcasts the same
    assert _mask_window(book.causal_mask(T + 5), T) == (True, None)  # the book's Llama 3 slices [:T, :T]
    if T > 1:
        assert _mask_window(~mask, T) == (False, None)
        assert _mask_window(mask.T, T) == (False, None)
        tampered = mask.clone()
        tampered[T // 2, 0] = not tampered[T // 2, 0]  # an inner row: the window is read off the last
        assert _mask_window(tampered, T) == (False, None)
    assert _mask_window(mask.float(), T) == (False, None)


CACHED = {
    "gqa": lambda d: book.GroupedQueryAttentionWithKVCache(d, d, 0.0, 4, 2),
    "swa": lambda d: book.MultiHeadAttentionWithSWA(d, d, 0.0, 4, qkv_bias=True, sliding_window_size=4),
}


@pytest.mark.parametrize("chunk", [None, 3], ids=["prefill", "chunked-prefill"])
@pytest.mark.parametrize("kind", list(CACHED))
def test_kv_cache_attentions_generate_the_same_tokens(kind, chunk, backend):
    model = randomised(book.CachedGPT(CACHED[kind]))
    unpatched = copy.deepcopy(model)
    report = fastgpt.patch(model, backend=backend)
    assert kinds(report) == {"fastgpt.patch.BookCachedAttention": 2, "fastgpt.nn.LayerNorm": 2}
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(book.generate_cached(model, prompt, 20, chunk), book.generate_cached(unpatched, prompt, 20, chunk))
    if kind == "swa":  # the cache keeps what the window can still see, as the book's does
        assert model.atts[0].cache_k.shape[2] == 4 == unpatched.atts[0].cache_k.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), unpatched(prompt), atol=2e-5, rtol=0)


def test_a_cached_call_after_an_uncached_one_needs_reset_cache():
    model = randomised(book.CachedGPT(CACHED["swa"]))
    fastgpt.patch(model)
    prompt = torch.randint(0, 97, (1, 5))
    book.generate_cached(model, prompt, 2)
    model(prompt)  # uncached, with tokens in the cache
    with pytest.raises(RuntimeError, match=r"call reset_cache\(\)"):
        model(prompt[:, :1], use_cache=True)
    model.reset_kv_cache()
    model(prompt, use_cache=True)


def test_a_module_with_a_filled_cache_is_left():
    model = randomised(book.CachedGPT(CACHED["swa"]))
    book.generate_cached(model, torch.randint(0, 97, (1, 5)), 2)
    report = fastgpt.patch(model)
    assert [reason for name, _, reason in report.left] == [
        "its KV cache holds tokens: patch between generations (after reset_cache())"] * 2


class ShiftedRMSNorm(book.RMSNorm):
    pass


ShiftedRMSNorm.__name__ = "RMSNorm"


class MeanCentredRMSNorm(nn.Module):
    """Named like an RMS norm, but subtracts the mean: neither offset reproduces it."""

    def __init__(self, dim):
        super().__init__()
        self.eps, self.scale = 1e-6, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


MeanCentredRMSNorm.__name__ = "RMSNorm"


def test_rms_norm_variants():
    norms = nn.ModuleDict({
        "torch": nn.RMSNorm(24, eps=1e-5), "torch_no_affine": nn.RMSNorm(24, elementwise_affine=False),
        "qwen3": book.RMSNorm(24), "not_qwen3_compatible": book.RMSNorm(24, qwen3_compatible=False),
        "gemma3": book.GemmaRMSNorm(24), "shifted": ShiftedRMSNorm(24, bias=True), "centred": MeanCentredRMSNorm(24),
    })
    randomised(norms)
    unpatched, originals = copy.deepcopy(norms), dict(norms.items())
    report = fastgpt.patch(norms)
    assert sorted(name for name, _, _ in report.swapped) == ["gemma3", "not_qwen3_compatible", "qwen3", "torch",
                                                             "torch_no_affine"]
    assert norms["gemma3"].offset == 1.0 and norms["qwen3"].offset == 0.0
    reasons = {name: reason for name, _, reason in report.left}
    assert reasons["shifted"] == "it adds a shift (bias) after the scale; fastgpt.rms_norm has none"
    assert "not x * rsqrt(mean(x²) + eps) * (1 + weight): on a probe input" in reasons["centred"]
    x = torch.randn(3, 5, 24)
    for name in ("torch", "torch_no_affine", "qwen3", "not_qwen3_compatible", "gemma3"):
        torch.testing.assert_close(norms[name](x), unpatched[name](x), atol=1e-5, rtol=1e-5, msg=name)
        shared = getattr(originals[name], "scale", getattr(originals[name], "weight", None))
        assert norms[name].weight is shared, name  # the very Parameter (None without affine)
