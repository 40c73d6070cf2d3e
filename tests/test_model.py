"""GPTModel: the book's architecture and names, backends, training, KV-cache generation."""
import copy
import math

import pytest
import torch
from checks import assert_close
from conftest import HAS_GPU, require_backend

import book_model as book
import fastgpt
from fastgpt.models.gpt2 import GELU
from fastgpt.nn import LayerNorm, MultiHeadAttention
from fastgpt.reference import layer_norm as reference_layer_norm

# head dim 16: the smallest every fused backend takes.
TINY = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
MODEL_BACKENDS = [
    "naive", "sdpa", "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
    # Triton's CPU interpreter is exercised by the kernel tests; a whole model there is too slow.
    pytest.param("triton", marks=[pytest.mark.triton,
                                  pytest.mark.skipif(not HAS_GPU, reason="model tests run Triton on a GPU only")]),
]


def tiny_model(backend="naive", device="cpu", seed=0, **overrides):
    torch.manual_seed(seed)
    return fastgpt.GPTModel({**TINY, **overrides}, backend=backend).to(device)


def token_batch(B, T, device="cpu", seed=1, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def loss_of(model, inputs, targets):
    logits = model(inputs)  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- architecture -------------------------------------------------------------------------

def test_forward_shape():
    model = tiny_model()
    logits = model(token_batch(3, 7))
    assert logits.shape == (3, 7, TINY["vocab_size"]) and logits.dtype == torch.float32


# Exercise 4.1 of the book: parameters with the untied output head (qkv_bias False).
BOOK_PARAMETER_COUNTS = {"gpt2-small": 163_009_536, "gpt2-medium": 406_212_608,
                         "gpt2-large": 838_220_800, "gpt2-xl": 1_637_792_000}


@pytest.mark.parametrize("name", sorted(BOOK_PARAMETER_COUNTS))
def test_parameter_count_matches_the_book(name):
    cfg = fastgpt.GPT2_CONFIGS[name]
    with torch.device("meta"):  # shapes only, no memory
        model = fastgpt.GPTModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == BOOK_PARAMETER_COUNTS[name]
    tied = total - model.out_head.weight.numel()
    assert tied == total - cfg["vocab_size"] * cfg["emb_dim"]
    if name == "gpt2-small":
        assert tied == 124_412_160  # the book: "considering weight tying: 124,412,160"


def test_configs_are_the_books():
    for name, (emb, heads, layers) in {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 16, 24),
                                       "gpt2-large": (1280, 20, 36), "gpt2-xl": (1600, 25, 48)}.items():
        assert fastgpt.GPT2_CONFIGS[name] == {"vocab_size": 50257, "context_length": 1024, "emb_dim": emb,
                                              "n_heads": heads, "n_layers": layers, "drop_rate": 0.1,
                                              "qkv_bias": False}


def test_config_registry_lookup():
    from fastgpt.models import CONFIG_NAMES, CONFIGS, LAPTOP_CONFIGS, model_config

    assert CONFIG_NAMES == ("tiny", "small", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
    assert CONFIGS == {**LAPTOP_CONFIGS, **fastgpt.GPT2_CONFIGS}
    assert LAPTOP_CONFIGS["tiny"] == {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4,
                                      "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}
    assert LAPTOP_CONFIGS["small"] == {**LAPTOP_CONFIGS["tiny"], "emb_dim": 256, "n_layers": 4}
    tiny = model_config("tiny", context_length=32, drop_rate=None)  # None: keep the config's value
    assert tiny == {**LAPTOP_CONFIGS["tiny"], "context_length": 32}
    tiny["n_layers"] = 99  # a copy: the registry is not changed through it
    assert model_config("tiny")["n_layers"] == 2 and model_config("gpt2-xl") == fastgpt.GPT2_CONFIGS["gpt2-xl"]
    with pytest.raises(ValueError, match="unknown config 'gpt2-huge'; expected one of tiny, small, gpt2-small"):
        model_config("gpt2-huge")
    with pytest.raises(ValueError, match="unknown keys emb"):
        model_config("tiny", emb=3)
    with pytest.raises(ValueError, match=r"emb_dim \(64\) must be divisible by n_heads \(3\)"):
        model_config("tiny", n_heads=3)


def test_state_dict_has_the_books_names_and_no_mask_buffer():
    """The book's module names; layer norms say weight/bias (torch's names, fastgpt.nn.LayerNorm)."""
    model = tiny_model(qkv_bias=False)
    assert list(model.buffers()) == []  # in particular no (T, T) causal mask
    block = {"att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
             "att.out_proj.bias", "ff.layers.0.weight", "ff.layers.0.bias", "ff.layers.2.weight",
             "ff.layers.2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "final_norm.bias", "out_head.weight"}
    expected |= {f"trf_blocks.{i}.{name}" for i in range(TINY["n_layers"]) for name in block}
    assert set(model.state_dict()) == expected


def test_blocks_are_fastgpt_nn_modules():
    """One attention and one layer norm in the house: GPTModel builds fastgpt.nn's."""
    model = tiny_model()
    norms = [model.final_norm] + [m for b in model.trf_blocks for m in (b.norm1, b.norm2)]
    assert all(type(norm) is fastgpt.nn.LayerNorm for norm in norms)
    assert all(type(block.att) is fastgpt.nn.MultiHeadAttention for block in model.trf_blocks)
    att = model.trf_blocks[0].att
    assert (att.num_heads, att.head_dim, att.context_length) == (2, 16, 16)
    assert isinstance(att.dropout, torch.nn.Dropout) and not att.fused_qkv
    assert isinstance(fastgpt.models.GPTModel(TINY).new_kv_cache(1)[0], fastgpt.nn.KVCache)
    assert fastgpt.GPTModel is fastgpt.models.GPTModel is fastgpt.models.gpt2.GPTModel


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["separate", "fused"])
def test_book_state_dict_loads_both_ways_strictly(fused_qkv):
    """The book's GPTModel (scale/shift, T x T mask buffers) loads strictly into GPTModel, and
    to_book_state_dict of GPTModel's state_dict loads strictly into the book's GPTModel; the
    logits agree each way (fused_qkv: the W_qkv variant of every block, split on the way back)."""
    cfg = book.tiny_config()
    torch.manual_seed(3)
    theirs = book.GPTModel(cfg).eval()
    ours = fastgpt.GPTModel(cfg, backend="naive").eval()
    if fused_qkv:
        for block in ours.trf_blocks:
            block.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], 0.0,
                                           cfg["n_heads"], cfg["qkv_bias"], backend="naive", fused_qkv=True)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(ours.final_norm.weight, theirs.final_norm.scale)
    assert torch.equal(ours.trf_blocks[1].norm2.bias, theirs.trf_blocks[1].norm2.shift)
    idx = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        oracle = copy.deepcopy(theirs).double()(idx)
        assert_close(ours(idx), oracle, what="fastgpt GPTModel with the book's weights")

    converted = fastgpt.nn.to_book_state_dict(ours, context_length=cfg["context_length"])
    assert set(converted) == set(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(converted[key], value), key  # masks included: triu(ones(T, T), 1)
    back = book.GPTModel(cfg).eval()
    result = back.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(back(idx), theirs(idx))
    # Without context_length, only the mask buffers are missing.
    result = book.GPTModel(cfg).load_state_dict(fastgpt.nn.to_book_state_dict(ours), strict=False)
    assert sorted(result.missing_keys) == [f"trf_blocks.{i}.att.mask" for i in range(cfg["n_layers"])]
    assert result.unexpected_keys == []


def test_layer_norm_and_gelu_are_the_books():
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    norm = LayerNorm(32, backend="naive").double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert_close(norm(x), reference_layer_norm(x, norm.weight, norm.bias, 1e-5))
    book_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    assert_close(GELU()(x), book_gelu)


def test_attention_is_causal():
    # Changing a later token must not change the earlier positions' logits.
    model = tiny_model(backend="sdpa")
    tokens = token_batch(1, 10)
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_dropout_only_in_training_mode():
    model = tiny_model(backend="naive", drop_rate=0.5)
    tokens = token_batch(2, 8)
    torch.manual_seed(0)
    first, second = model(tokens), model(tokens)
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_bad_config_backend_and_length():
    with pytest.raises(ValueError, match="missing qkv_bias"):
        fastgpt.GPTModel({k: v for k, v in TINY.items() if k != "qkv_bias"})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        fastgpt.GPTModel({**TINY, "n_heads": 3})
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastgpt.GPTModel(TINY, backend="fast")
    with pytest.raises(ValueError, match="exceed context_length 16"):
        tiny_model()(token_batch(1, 17))


def test_set_backend_reaches_every_module():
    model = tiny_model().set_backend("sdpa")
    routed = [m.backend for m in model.modules() if isinstance(m, (LayerNorm, MultiHeadAttention))]
    assert len(routed) == 3 * TINY["n_layers"] + 1 and set(routed) == {"sdpa"}


# ---- training on every backend -------------------------------------------------------------

@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_training_reduces_the_loss(backend):
    device = require_backend(backend)
    model = tiny_model(backend, device, drop_rate=0.1).train()
    inputs, targets = token_batch(4, 16, device, seed=2), token_batch(4, 16, device, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(model, inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_loss_and_gradients_equal_the_float64_oracle(backend):
    """Same weights and batch, drop_rate 0: every backend gives the float64 naive loss and gradients."""
    device = require_backend(backend)
    inputs, targets = token_batch(2, 16, device, seed=2), token_batch(2, 16, device, seed=3)
    oracle = tiny_model("naive", device).double()
    oracle_loss = loss_of(oracle, inputs, targets)
    oracle_loss.backward()
    model = tiny_model(backend, device)
    loss = loss_of(model, inputs, targets)
    loss.backward()
    assert_close(loss.detach(), oracle_loss.detach(), what=f"{backend} loss")
    for (name, p), p64 in zip(model.named_parameters(), oracle.parameters()):
        assert_close(p.grad, p64.grad, what=f"{backend} grad of {name}")


# ---- KV cache and generation -------------------------------------------------------------

@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_kv_cache_logits_equal_the_full_forward(backend):
    device = require_backend(backend)
    model = tiny_model(backend, device).eval()
    tokens = token_batch(2, 12, device)
    with torch.no_grad():
        oracle = tiny_model("naive", device).double()(tokens)  # (B, T, vocab)
        cache = model.new_kv_cache(batch_size=2)
        steps = [model(tokens[:, :8], cache)]  # prefill 8 tokens, then 4 single-token steps (Tq=1 < Tk)
        steps += [model(tokens[:, t:t + 1], cache) for t in range(8, 12)]
    assert cache[0].length == 12
    assert_close(torch.cat(steps, dim=1), oracle, what=f"{backend} cached logits")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_greedy_generation_with_cache_equals_without(backend):
    device = require_backend(backend)
    model = tiny_model(backend, device, context_length=32)
    prompt = token_batch(2, 5, device)
    cached = model.generate(prompt, max_new_tokens=12)
    assert cached.shape == (2, 17) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=12, use_cache=False))


def test_generate_without_cache_is_the_books_argmax_loop():
    model = tiny_model(context_length=32).eval()
    ids = token_batch(1, 4)
    out = model.generate(ids, max_new_tokens=6, use_cache=False)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_top_k_holds():
    model = tiny_model(context_length=32)
    prompt = token_batch(2, 4)
    torch.manual_seed(7)
    first = model.generate(prompt, max_new_tokens=10, temperature=1.5, top_k=5)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(prompt, max_new_tokens=10, temperature=1.5, top_k=5))
    torch.manual_seed(8)
    assert not torch.equal(first, model.generate(prompt, max_new_tokens=10, temperature=1.5, top_k=5))
    with torch.no_grad():  # every sampled token is among the 5 largest logits of its step
        for t in range(4, 14):
            top5 = model(first[:, :t])[:, -1].topk(5).indices  # (B, 5)
            assert (top5 == first[:, t:t + 1]).any(dim=1).all()
    greedy = model.generate(prompt, max_new_tokens=10)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=1), greedy)


def test_eos_stops_each_sequence_and_pads_with_eos():
    model = tiny_model(context_length=64)
    prompt = token_batch(3, 4, seed=5)
    free = model.generate(prompt, max_new_tokens=30)[:, 4:]  # (3, 30) new tokens without eos
    eos_id = int(free[0, 2])
    first_eos = [int((row == eos_id).nonzero()[0]) if (row == eos_id).any() else None for row in free]
    # Rows are independent: each follows its free run up to its eos, then repeats eos;
    # generation stops once every row has emitted eos.
    length = max(first_eos) + 1 if None not in first_eos else 30
    expected = free[:, :length].clone()
    for row, i in enumerate(first_eos):
        if i is not None:
            expected[row, i:] = eos_id
    assert torch.equal(model.generate(prompt, max_new_tokens=30, eos_id=eos_id)[:, 4:], expected)
    single = model.generate(prompt[:1], max_new_tokens=30, eos_id=eos_id)
    assert single.shape[1] == 4 + first_eos[0] + 1 <= 4 + 3 and single[0, -1] == eos_id


def test_generation_beyond_context_slides_the_window():
    model = tiny_model()  # context_length 16
    prompt = token_batch(2, 12)
    out = model.generate(prompt, max_new_tokens=10)  # the cache fills after 4 tokens, then the window slides
    assert out.shape == (2, 22) and torch.equal(out[:, :12], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=10, use_cache=False))
    with torch.no_grad():  # each new token is the argmax given the last context_length tokens
        for t in range(12, 22):
            assert torch.equal(out[:, t], model(out[:, max(0, t - 16):t])[:, -1].argmax(-1))
    long_prompt = token_batch(1, 20)  # longer than the context: the model sees its last 16 tokens
    out = model.generate(long_prompt, max_new_tokens=3)
    assert torch.equal(out[:, :20], long_prompt)
    assert torch.equal(out[:, 20:], model.generate(long_prompt[:, -16:], max_new_tokens=3)[:, 16:])


def test_generate_restores_mode_and_tracks_no_gradients():
    model = tiny_model(drop_rate=0.5).train()
    out = model.generate(token_batch(1, 3), max_new_tokens=4)
    assert model.training and not out.requires_grad
    model.eval()
    model.generate(token_batch(1, 3), max_new_tokens=4)
    assert not model.training


def test_generate_rejects_bad_arguments():
    model = tiny_model()
    prompt = token_batch(1, 3)
    with pytest.raises(ValueError, match="integer token ids"):
        model.generate(prompt.float())
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, temperature=-1.0)
