"""fastgpt.hf: attn_implementation="fastgpt" in Hugging Face transformers.

A small random GPT-2 (dropout 0) runs with "eager" (transformers' own matmul attention:
the reference) and with fastgpt on each backend; logits and greedy generations must
match, and a spy on fastgpt.ops.attention proves the fused path was taken. Today's families
(Llama with grouped-query attention, Mistral's and Qwen3's sliding windows, Gemma 2's sliding
layers and softcap, Gemma 3) run the same way, with no fallback to transformers' sdpa.
"""
import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastgpt  # noqa: E402
import fastgpt.hf  # noqa: E402
from conftest import require_backend  # noqa: E402

BACKENDS = ("naive", "sdpa", "cpu")
VOCAB = 101
ATOL = 1e-4  # float32 logits of O(1..10): two orderings of the same float32 arithmetic


@pytest.fixture(params=BACKENDS, ids=lambda b: f"backend={b}")
def implementation(request):
    require_backend(request.param)
    return fastgpt.hf.register(backend=request.param, name=f"fastgpt-{request.param}")


def gpt2_config():
    # initializer_range 0.2 (not 0.02) makes the random logits peaked enough that greedy
    # decoding does not get stuck repeating one token, so a wrong step would show.
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def eager_model():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation="eager").eval()


def same_weights(model, implementation):
    twin = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(model.config),
                                                         attn_implementation=implementation)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture
def fused_calls(monkeypatch):
    """Each call of fastgpt.ops.attention from fastgpt.hf: (Tq, Tk, has key_padding_mask)."""
    calls = []
    original = fastgpt.ops.attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs.get("key_padding_mask") is not None))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fastgpt.ops, "attention", spy)
    return calls


def prompt(batch=3, length=12, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padding(kind, batch=3, length=12):
    """1 = token, 0 = padding; row 0 is unpadded, the others padded by 3 and 5."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in ((1, 3), (2, 5)):
        if kind == "left":
            mask[row, :pad] = 0
        else:
            mask[row, length - pad:] = 0
    return mask


@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_logits_match_eager(eager_model, implementation, fused_calls, pad):
    model = same_weights(eager_model, implementation)
    ids = prompt()
    mask = None if pad is None else padding(pad)
    with torch.no_grad():
        want = eager_model(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    # Padded positions attend to nothing real: eager gives them a uniform mix, fastgpt zeros;
    # their logits mean nothing, so only real tokens are compared.
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    assert fused_calls == [(12, 12, mask is not None)] * 2  # one fused call per layer


def test_greedy_generation_with_kv_cache_matches_eager(eager_model, implementation, fused_calls):
    model = same_weights(eager_model, implementation)
    ids, mask = prompt(), padding("left")
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = eager_model.generate(ids, **settings)
        got = model.generate(ids, **settings)
    assert want.shape == (3, 22)
    assert torch.equal(got, want)
    # A prefill over the prompt, then one query against the growing cache per token.
    assert fused_calls[:2] == [(12, 12, True)] * 2
    assert fused_calls[2:] == [(1, 12 + step, True) for step in range(1, 10) for _ in range(2)]


def test_static_cache_runs_fused(eager_model, fused_calls):
    """A static cache's keys run past the queries; their empty slots are cut off, not attended."""
    model = same_weights(eager_model, "fastgpt")
    ids, mask = prompt(), padding("left")
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                    cache_implementation="static")
    with torch.no_grad():
        want = eager_model.generate(ids, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            got = model.generate(ids, **settings)
    assert torch.equal(got, want)
    assert [tq for tq, _, _ in fused_calls] == [12] * 2 + [1] * 10


def test_from_pretrained_with_attn_implementation_fastgpt(eager_model, tmp_path, fused_calls):
    eager_model.save_pretrained(tmp_path)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="fastgpt").eval()
    assert model.config._attn_implementation == "fastgpt"
    ids, mask = prompt(), padding("left")
    with torch.no_grad():
        want = eager_model(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)
    assert len(fused_calls) == 2


def causal_minus_previous_token(T: int) -> torch.Tensor:
    """A caller's additive 4-D mask (2, 1, T, T) no causal + key padding can express: causal, and
    each token also hides the one before it."""
    keep = torch.ones(T, T).tril().bool() & ~torch.ones(T, T).tril(-1).triu(-1).bool()
    return torch.zeros(2, 1, T, T).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_a_4d_mask_falls_back_to_sdpa_with_a_warning(eager_model, fused_calls, monkeypatch):
    """A caller's 4-D mask (here: each token also hides the one before it) is no causal + key
    padding: fastgpt.hf hands it to transformers' sdpa and says so once."""
    monkeypatch.setattr(fastgpt.hf, "_warned", set())
    monkeypatch.setattr(fastgpt.hf, "FALLBACKS", set())
    model = same_weights(eager_model, "fastgpt")
    T = 8
    additive = causal_minus_previous_token(T)
    ids = prompt(batch=2, length=T)
    with torch.no_grad():
        want = eager_model(ids, attention_mask=additive).logits
        with pytest.warns(RuntimeWarning, match=r"4-D float32 attention mask of shape \(2, 1, 8, 8\) cannot "
                                                 r"be expressed as causal \+ key padding.*sdpa"):
            got = model(ids, attention_mask=additive).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert fused_calls == []
    assert fastgpt.hf.FALLBACKS == {"a 4-D float32 attention mask of shape (2, 1, 8, 8) cannot be expressed as "
                                    "causal + key padding"}


@pytest.mark.parametrize("q_offset, q_length, kv_length", [(0, 5, 5), (4, 1, 5), (0, 5, 16), (7, 2, 16)])
def test_mask_function_covers_exactly_the_causal_keys(q_offset, q_length, kv_length):
    """What fastgpt_mask returns, run as the attention function runs it, is transformers' own mask."""
    padded = torch.ones(2, q_offset + q_length, dtype=torch.bool)
    padded[1, 0] = False
    for attention_mask in (None, padded):
        got = fastgpt.hf.fastgpt_mask(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                      kv_offset=0, attention_mask=attention_mask)
        want = transformers.masking_utils.sdpa_mask(batch_size=2, q_length=q_length, kv_length=kv_length,
                                                    q_offset=q_offset, attention_mask=attention_mask,
                                                    allow_is_causal_skip=False)  # (2, 1, Tq, Tk)
        visible = kv_length if got is None else got.shape[-1]
        keep = fastgpt.reference.visible_keys(q_length, visible, True, got, "cpu")  # (2|1, 1, Tq, Tk')
        full = torch.zeros(2, 1, q_length, kv_length, dtype=torch.bool)
        full[..., :visible] = keep
        assert torch.equal(full, want)


@pytest.mark.parametrize("pattern", ["chunked", "bidirectional", "or_mask"])
def test_other_mask_patterns_get_the_sdpa_mask(pattern):
    """Chunked, bidirectional or or-ed patterns are no causal (+ window) + key padding: the 4-D
    mask transformers builds for sdpa."""
    mu = transformers.masking_utils
    function = {"chunked": mu.chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long)),
                "bidirectional": mu.bidirectional_mask_function,
                "or_mask": mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(2))}[pattern]
    got = fastgpt.hf.fastgpt_mask(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                                  mask_function=function, attention_mask=torch.ones(1, 6, dtype=torch.bool))
    want = mu.sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=function,
                        attention_mask=torch.ones(1, 6, dtype=torch.bool), allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=False)
    assert got.shape == (1, 1, 6, 6) and torch.equal(got, want)


@pytest.mark.parametrize("q_offset, q_length, kv_offset, kv_length", [(0, 8, 0, 8), (8, 1, 5, 4), (0, 3, 0, 4),
                                                                       (6, 2, 3, 5), (7, 1, 0, 16)])
def test_mask_function_covers_exactly_the_sliding_window_keys(q_offset, q_length, kv_offset, kv_length):
    """transformers' sliding-window causal mask (also at a sliding cache's kv offset) = what
    fastgpt_mask returns run with window=W, as the attention function runs it."""
    W = 3
    padded = torch.ones(2, q_offset + q_length, dtype=torch.bool)
    padded[1, :2] = False
    function = transformers.masking_utils.sliding_window_causal_mask_function(W)
    for attention_mask in (None, padded):
        got = fastgpt.hf.fastgpt_mask(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                      kv_offset=kv_offset, attention_mask=attention_mask, mask_function=function,
                                      local_size=W)
        assert got is None or (got.dtype == torch.bool and got.dim() == 2)
        want = transformers.masking_utils.sdpa_mask(batch_size=2, q_length=q_length, kv_length=kv_length,
                                                    q_offset=q_offset, kv_offset=kv_offset, mask_function=function,
                                                    attention_mask=attention_mask, allow_is_causal_skip=False)
        visible = kv_length if got is None else got.shape[-1]
        keep = fastgpt.reference.visible_keys(q_length, visible, True, got, "cpu", W)  # (2|1, 1, Tq, Tk')
        full = torch.zeros(2, 1, q_length, kv_length, dtype=torch.bool)
        full[..., :visible] = keep
        assert torch.equal(full, want)


def test_a_window_that_disagrees_with_local_size_keeps_the_sdpa_mask():
    function = transformers.masking_utils.sliding_window_causal_mask_function(3)
    got = fastgpt.hf.fastgpt_mask(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                                  mask_function=function, local_size=4)
    assert got.shape == (1, 1, 6, 6)


# Today's model families, tiny and random: grouped-query attention everywhere (4 query heads
# read 2 key/value heads), sliding windows of 4 keys on 12-token prompts, Gemma 2's softcap.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.2,
              attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
WINDOW, SOFTCAP = 4, 2.0


def modern_config(family):
    """(config, the (window, softcap) each layer's attention must run with)."""
    if family == "llama":
        return transformers.LlamaConfig(**COMMON), [(None, None)] * 2
    if family == "mistral":  # one window on every layer
        return transformers.MistralConfig(**COMMON, sliding_window=WINDOW), [(WINDOW, None)] * 2
    if family == "qwen2":  # Qwen2's attention has q/k/v biases
        return transformers.Qwen2Config(**COMMON), [(None, None)] * 2
    if family == "qwen3":  # use_sliding_window: layers from max_window_layers on slide
        if not hasattr(transformers, "Qwen3Config"):
            pytest.skip("this transformers has no Qwen3")
        return (transformers.Qwen3Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                [(None, None), (WINDOW, None)])
    gemma = dict(COMMON, initializer_range=0.05)  # Gemma scales embeddings by sqrt(hidden): keep logits sane
    if family == "gemma2":  # sliding, then full layers; attention logits soft-capped
        return (transformers.Gemma2Config(**gemma, sliding_window=WINDOW, attn_logit_softcapping=SOFTCAP,
                                          final_logit_softcapping=None, query_pre_attn_scalar=16),
                [(WINDOW, SOFTCAP), (None, SOFTCAP)])
    if family == "gemma3":
        if not hasattr(transformers, "Gemma3TextConfig"):
            pytest.skip("this transformers has no Gemma 3")
        return (transformers.Gemma3TextConfig(**gemma, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                              layer_types=["sliding_attention", "full_attention"]),
                [(WINDOW, None), (None, None)])
    raise AssertionError(family)


FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3")


@pytest.fixture
def modern_calls(monkeypatch):
    """Each call of fastgpt.ops.attention from fastgpt.hf: (q shape, k shape, window, softcap, backend)."""
    calls = []
    original = fastgpt.ops.attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), kwargs.get("window"), kwargs.get("softcap"),
                      kwargs.get("backend")))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fastgpt.ops, "attention", spy)
    monkeypatch.setattr(fastgpt.hf, "FALLBACKS", set())
    monkeypatch.setattr(fastgpt.hf, "_warned", set())
    return calls


def modern_pair(family, implementation):
    config, layers = modern_config(family)
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return eager, same_weights(eager, implementation), layers


def expected_fallbacks(backend, family):
    """What an explicit backend that does not implement a feature yet records (auto: nothing)."""
    if backend == "auto":
        return set()
    _, layers = modern_config(family)
    reasons = set()
    for window, softcap in layers:
        features = fastgpt.backends.attention_features(4, 2, window, softcap)
        why = fastgpt.backends.refusal(backend, "attention", torch.device("cpu"), torch.float32, 16, features)
        if why is not None:
            reasons.add(f"backend={backend!r} cannot run this call: {why}")
    return reasons


@pytest.fixture(params=("auto", "cpu"), ids=lambda b: f"backend={b}")
def modern_backend(request):
    if request.param != "auto":
        require_backend(request.param)
    return request.param


@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_modern_families_match_eager_without_fallback(family, pad, modern_backend, modern_calls):
    name = "fastgpt" if modern_backend == "auto" else fastgpt.hf.register(backend=modern_backend,
                                                                            name=f"fastgpt-{modern_backend}")
    eager, model, layers = modern_pair(family, name)
    ids = prompt()
    mask = None if pad is None else padding(pad)
    want_fallbacks = expected_fallbacks(modern_backend, family)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        want = eager(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    # auto: no fallback at all; an explicit backend that lacks a feature says so (and runs auto)
    assert {str(w.message).split("fastgpt.hf: ")[-1].split("; these calls")[0] for w in caught
            if issubclass(w.category, RuntimeWarning)} == want_fallbacks
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    assert fastgpt.hf.FALLBACKS == want_fallbacks
    # One fused call per layer, k/v with their 2 heads (never repeated to 4), the layer's window and softcap.
    assert [call[:4] for call in modern_calls] == [((3, 4, 12, 16), (3, 2, 12, 16), w, c) for w, c in layers]


@pytest.mark.parametrize("cache", ["dynamic", "static", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_modern_families_generate_like_eager_with_the_kv_cache(family, cache, modern_calls):
    eager, model, layers = modern_pair(family, "fastgpt")
    ids, mask = prompt(), padding("left")
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    if cache == "static":
        settings["cache_implementation"] = "static"
    elif cache == "none":
        settings["use_cache"] = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        want = eager.generate(ids, **settings)
        got = model.generate(ids, **settings)
    assert want.shape == (3, 22)
    assert torch.equal(got, want)
    assert fastgpt.hf.FALLBACKS == set()
    assert len(modern_calls) == 2 * 10  # the prefill, then one step per new token, each layer once
    for index, (q_shape, k_shape, window, softcap, _) in enumerate(modern_calls):
        (layer_window, layer_softcap), step = layers[index % 2], index // 2
        Tq = 12 + step if cache == "none" else (12 if step == 0 else 1)
        assert q_shape == (3, 4, Tq, 16) and k_shape[:2] == (3, 2)  # 2 kv heads, never repeated
        assert softcap == layer_softcap
        # The window reaches the kernel whenever it hides keys; a sliding layer's cache keeps only
        # the keys its window sees (W per step), and then there is nothing left to hide.
        assert window == (layer_window if layer_window is not None and layer_window < k_shape[2] else None)
        if cache == "none":
            assert k_shape[2] == 12 + step
        elif step > 0 and layer_window is not None:
            assert k_shape[2] == WINDOW


def test_gqa_never_repeats_keys_and_values(monkeypatch, modern_calls):
    """Grouped-query attention reaches fastgpt.attention as (B, Hkv, Tk, D): no repeat_interleave."""
    eager, model, _ = modern_pair("llama", "fastgpt")
    callers = []
    original = torch.Tensor.repeat_interleave

    def spy(self, *args, **kwargs):
        callers.append(sys._getframe(1).f_code.co_filename)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", spy)
    with torch.no_grad():
        model(prompt(), attention_mask=padding("left"))
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", original)
    assert [call[1] for call in modern_calls] == [(3, 2, 12, 16)] * 2  # (B, Hkv, Tk, D) as the model made them
    assert not [caller for caller in callers if caller == fastgpt.hf.__file__]


def test_a_4d_mask_with_softcap_falls_back_to_the_eager_attention(modern_calls):
    """transformers' sdpa has no softcap: a Gemma 2 call fastgpt cannot express runs the model's eager attention."""
    eager, model, _ = modern_pair("gemma2", "fastgpt")
    T = 8
    additive = causal_minus_previous_token(T)
    ids = prompt(batch=2, length=T)
    with torch.no_grad():
        want = eager(ids, attention_mask=additive).logits
        with pytest.warns(RuntimeWarning, match="eager attention"):
            got = model(ids, attention_mask=additive).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert modern_calls == []


def test_attention_sinks_still_fall_back():
    assert "s_aux" in fastgpt.hf._UNSUPPORTED_KWARGS and "position_bias" in fastgpt.hf._UNSUPPORTED_KWARGS
    assert "sliding_window" not in fastgpt.hf._UNSUPPORTED_KWARGS and "softcap" not in fastgpt.hf._UNSUPPORTED_KWARGS


def test_register_refuses_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.hf.register(backend="fast")


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_windows_and_softcap_trace_under_torch_compile(family, modern_calls):
    """The sliding-window mask is recognised, and window/softcap reach fastgpt.attention, inside a
    fullgraph torch.compile too (aot_eager: tracing is what is tested)."""
    _, model, _ = modern_pair(family, "fastgpt")
    ids, mask = prompt(), padding("left")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)
    assert fastgpt.hf.FALLBACKS == set()
