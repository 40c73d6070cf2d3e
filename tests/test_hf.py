"""fastgpt.hf: attn_implementation="fastgpt" in Hugging Face transformers.

A small random GPT-2 (dropout 0) runs with "eager" (transformers' own matmul attention:
the reference) and with fastgpt on each backend; logits and greedy generations must
match, and a spy on fastgpt.ops.attention proves the fused path was taken.
"""
import copy
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


def test_a_4d_mask_falls_back_to_sdpa_with_a_warning(eager_model, fused_calls, monkeypatch):
    """A caller's 4-D mask (here: each token also hides the one before it) is no causal + key
    padding: fastgpt.hf hands it to transformers' sdpa and says so once."""
    monkeypatch.setattr(fastgpt.hf, "_warned", set())
    monkeypatch.setattr(fastgpt.hf, "FALLBACKS", set())
    model = same_weights(eager_model, "fastgpt")
    T = 8
    keep = torch.ones(T, T).tril().bool() & ~torch.ones(T, T).tril(-1).triu(-1).bool()  # causal minus j = i-1
    additive = torch.zeros(2, 1, T, T).masked_fill(~keep, torch.finfo(torch.float32).min)
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


def test_other_mask_patterns_get_the_sdpa_mask():
    """A sliding window is no causal + key padding: the 4-D mask transformers builds for sdpa."""
    window = transformers.masking_utils.sliding_window_causal_mask_function(3)
    got = fastgpt.hf.fastgpt_mask(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                                  mask_function=window)
    want = transformers.masking_utils.sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=window,
                                                allow_is_causal_skip=False)
    assert got.shape == (1, 1, 6, 6) and torch.equal(got, want)


def test_register_refuses_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.hf.register(backend="fast")
