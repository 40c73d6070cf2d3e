"""Llama 3, Qwen 3 and Gemma 3 (fastgpt/models/llama3.py, qwen3.py, gemma3.py, blocks.py) and
their Hugging Face loaders (fastgpt/weights.py), checked against transformers'
LlamaForCausalLM / Qwen3ForCausalLM / Gemma3ForCausalLM built tiny with random weights:
same logits, same greedy tokens with and without the KV cache, sharded checkpoints, the
book's names and configs, clear errors for bad checkpoints. (GPT-2: tests/test_model.py,
tests/test_weights.py.)"""
import json

import pytest
import torch
from conftest import HAS_GPU, require_backend

import fastgpt
from fastgpt.models import Gemma3Model, Llama3Model, Qwen3Model, build_model, model_config
from fastgpt.models.blocks import compute_rope_params
from fastgpt.weights import architecture_of, load_book_state_dict, load_gemma3, load_llama3, load_pretrained, load_qwen3

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (installed with transformers)

VOCAB, PROMPT_LEN, NEW_TOKENS = 128, 24, 20
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama: GQA 4 query / 2 kv heads, tied head, "llama3" RoPE scaling with an original
    # context short enough that all three frequency bands occur.
    "llama3": (lambda: transformers.LlamaConfig(
        **COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, tie_word_embeddings=True),
        "LlamaForCausalLM", Llama3Model, load_llama3),
    # Qwen 3: head_dim 32 != 64 / 4, QK-norm, untied head.
    "qwen3": (lambda: transformers.Qwen3Config(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=32,
                                               rope_theta=1_000_000.0, tie_word_embeddings=False),
              "Qwen3ForCausalLM", Qwen3Model, load_qwen3),
    # Gemma 3: MQA, sliding (window 8 < the 24-token prompt) and full layers with their own RoPE
    # thetas, query_pre_attn_scalar != head_dim, tied head.
    "gemma3": (lambda: transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=3, num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24),
        "Gemma3ForCausalLM", Gemma3Model, load_gemma3),
}
MODEL_BACKENDS = ["naive", "sdpa", "cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                  pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
                      not HAS_GPU, reason="model tests run Triton on a GPU only")])]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model, seed=0):
    """Every parameter N(0, 0.2): far from the init (norm weights 1 or 0), so a loader that drops
    a norm, or a model that forgets Gemma's (1 + w), changes the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def hf_model(family, seed=0, **overrides):
    transformers.logging.set_verbosity_error()
    config = FAMILIES[family][0]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    cls = getattr(transformers, FAMILIES[family][1])
    torch.manual_seed(seed)
    return randomise(cls(config), seed).eval()


def token_batch(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


class Reference:
    """A tiny random HF model saved twice (one file; shards + index), with its outputs."""

    def __init__(self, family, root):
        self.family = family
        self.hf = hf_model(family)
        self.dir, self.sharded = root / "single", root / "sharded"
        self.hf.save_pretrained(self.dir)
        self.hf.save_pretrained(self.sharded, max_shard_size="40KB")
        self.prompt = token_batch(2, PROMPT_LEN)
        with torch.no_grad():
            self.logits = self.hf(self.prompt).logits  # (2, 24, VOCAB), float32
            self.greedy = self.hf.generate(self.prompt[:, :5], max_new_tokens=NEW_TOKENS, do_sample=False,
                                           pad_token_id=0, eos_token_id=None)  # (2, 25)


@pytest.fixture(scope="module", params=list(FAMILIES))
def ref(request, tmp_path_factory):
    return Reference(request.param, tmp_path_factory.mktemp(request.param))


def assert_logits_close(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{what}: max |fastgpt - transformers| = {err:.3g} > 1e-4 (logits up to {want.abs().max():.3g})"


# ---- parity with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_logits_match_transformers(ref, backend):
    device = require_backend(backend)
    model = load_pretrained(str(ref.dir), backend=backend).to(device)
    assert type(model) is FAMILIES[ref.family][2]
    with torch.no_grad():
        logits = model(ref.prompt.to(device))
    assert logits.dtype == torch.float32
    assert_logits_close(logits.cpu(), ref.logits, f"{ref.family} {backend}")


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_greedy_tokens_match_transformers(ref, backend, use_cache):
    device = require_backend(backend)
    model = load_pretrained(str(ref.dir), backend=backend).to(device)
    out = model.generate(ref.prompt[:, :5].to(device), max_new_tokens=NEW_TOKENS, use_cache=use_cache)
    assert torch.equal(out.cpu(), ref.greedy)


def test_kv_cache_logits_equal_transformers(ref):
    """Prefill 10 tokens, then one at a time: the cached logits are transformers' full forward
    (for Gemma the cache outgrows the window, and the kernel keeps to the last 8 keys)."""
    model = load_pretrained(str(ref.dir), backend="cpu")
    cache = model.new_kv_cache(batch_size=2, max_len=PROMPT_LEN)
    assert cache[0].keys.shape == (2, model.cfg["n_kv_groups"], PROMPT_LEN, model.head_dim)  # Hkv heads only
    with torch.no_grad():
        steps = [model(ref.prompt[:, :10], cache)]
        steps += [model(ref.prompt[:, t:t + 1], cache) for t in range(10, PROMPT_LEN)]
    assert_logits_close(torch.cat(steps, dim=1), ref.logits, f"{ref.family} cached")


def test_sharded_checkpoint_loads_the_same(ref):
    index = json.loads((ref.sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (ref.sharded / "model.safetensors").exists()
    single, sharded = load_pretrained(str(ref.dir)), load_pretrained(str(ref.sharded), backend="naive")
    assert single.state_dict().keys() == sharded.state_dict().keys()
    for key, value in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[key], value), key
    with torch.no_grad():
        assert_logits_close(sharded(ref.prompt), ref.logits, f"{ref.family} sharded")


def test_loaded_model_mirrors_the_hf_config(ref):
    model = load_pretrained(str(ref.dir), backend="sdpa")
    hf = ref.hf.config
    assert architecture_of(str(ref.dir)) == ref.family and model.family == ref.family
    assert not model.training and model.backend == "sdpa"
    assert (model.cfg["emb_dim"], model.cfg["n_heads"], model.cfg["n_kv_groups"], model.head_dim,
            model.cfg["hidden_dim"], model.cfg["context_length"]) == (64, 4, hf.num_key_value_heads, hf.head_dim,
                                                                      128, 64)
    assert (model.out_head.weight is model.tok_emb.weight) == hf.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == ref.hf.num_parameters()
    att = model.trf_blocks[0].att
    assert type(att) is fastgpt.nn.GroupedQueryAttention and isinstance(att, fastgpt.nn._CausalSelfAttention)
    assert (att.q_norm is not None) == (ref.family != "llama3")
    assert list(model.buffers()) and not any(k.startswith(("cos", "sin")) for k in model.state_dict())
    if ref.family == "gemma3":
        assert [b.att.window for b in model.trf_blocks] == [8, None, 8]
        assert [b.rope_kind for b in model.trf_blocks] == ["_local", "_global", "_local"]
        assert model.cfg["rope_local_base"] == 10_000.0 and model.cfg["rope_base"] == 1_000_000.0
        assert att.scale == 24 ** -0.5 and model.final_norm.offset == 1.0
    if ref.family == "llama3":
        assert model.cfg["rope_freq"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_context_length": 16}
    half = load_pretrained(str(ref.sharded), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half(ref.prompt[:, :6]).dtype == torch.bfloat16


def test_gemma3_window_and_offsets_matter(tmp_path):
    """The Gemma reference is sensitive to what the model adds: without the window of a sliding
    layer, or with w instead of (1 + w) in a norm, the logits leave transformers'."""
    hf = hf_model("gemma3")
    hf.save_pretrained(tmp_path)
    prompt = token_batch(1, PROMPT_LEN)
    model = load_gemma3(str(tmp_path), backend="naive")
    with torch.no_grad():
        want = hf(prompt).logits
        assert_logits_close(model(prompt), want, "gemma3")
        model.trf_blocks[0].att.window = None
        assert (model(prompt) - want).abs().max() > 1e-2
        model.trf_blocks[0].att.window = 8
        model.final_norm.offset = 0.0
        assert (model(prompt) - want).abs().max() > 1e-2


# ---- RoPE tables ----------------------------------------------------------------------------

@pytest.mark.parametrize("rope_type", ["default", "llama3", "linear"])
def test_rope_tables_equal_transformers(rope_type):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0},
               "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}[rope_type]
    config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128, rope_theta=500_000.0,
                                      rope_scaling=scaling, max_position_embeddings=131_072)
    if rope_type == "default":
        dim, theta = 128, 500_000.0
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        freq = None
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        freq = ({"type": "linear", "factor": 4.0} if rope_type == "linear" else
                {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192})
    cos, sin = compute_rope_params(128, 500_000.0, 4096, freq)
    angles = torch.arange(4096).float()[:, None] * inv_freq[None, :]
    assert cos.shape == sin.shape == (4096, 128)
    assert torch.allclose(cos, torch.cat([angles, angles], 1).cos(), atol=1e-6)
    assert torch.allclose(sin, torch.cat([angles, angles], 1).sin(), atol=1e-6)
    if rope_type == "llama3":  # the three bands: high frequencies kept, low ones divided by 32
        plain = 1.0 / 500_000.0 ** (torch.arange(0, 128, 2).float() / 128)
        assert torch.equal(inv_freq[:4], plain[:4]) and torch.allclose(inv_freq[-4:], plain[-4:] / 32)


# ---- the book's configs and names -------------------------------------------------------------

# The book's notebooks print these counts (all parameters, and without the tied head).
BOOK_PARAMETER_COUNTS = {"llama3.2-1b": (1_498_482_688, 1_235_814_400), "qwen3-0.6b": (751_632_384, 596_049_920),
                         "gemma3-270m": (435_870_336, 268_098_176)}


@pytest.mark.parametrize("name", sorted(BOOK_PARAMETER_COUNTS))
def test_parameter_counts_match_the_book(name):
    with torch.device("meta"):
        model = build_model(name)
    total = sum(p.numel() for p in model.parameters())
    assert (total, total - model.tok_emb.weight.numel()) == BOOK_PARAMETER_COUNTS[name]


def test_configs_are_the_books():
    gemma = model_config("gemma3-270m")
    assert gemma["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (gemma["sliding_window"], gemma["head_dim"], gemma["n_kv_groups"], gemma["query_pre_attn_scalar"],
            gemma["rope_local_base"], gemma["rope_base"]) == (512, 256, 1, 256, 10_000.0, 1_000_000.0)
    llama = model_config("llama3.2-1b")
    assert llama["rope_freq"] == {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_context_length": 8192}
    assert (llama["rope_base"], llama["n_kv_groups"], llama["norm_eps"], llama["head_dim"]) == (500_000.0, 8, 1e-5,
                                                                                               None)
    qwen = model_config("qwen3-0.6b")
    assert (qwen["head_dim"], qwen["qk_norm"], qwen["emb_dim"], qwen["n_layers"]) == (128, True, 1024, 28)
    assert fastgpt.models.family_of("qwen3-32b") == "qwen3" and fastgpt.models.family_of("tiny") == "gpt2"
    assert "llama3.2-1b" not in fastgpt.models.CONFIG_NAMES  # CONFIG_NAMES: the GPT-2 family, what `fastgpt train` takes
    with pytest.raises(ValueError, match="must be a multiple of n_kv_groups"):
        model_config("llama3-tiny", n_kv_groups=3)
    with pytest.raises(ValueError, match="layer_types must list n_layers=4"):
        model_config("gemma3-tiny", n_layers=4)
    with pytest.raises(ValueError, match="llama3 config has unknown keys drop_rate"):
        model_config("llama3-tiny", drop_rate=0.1)
    with pytest.raises(ValueError, match="rope_freq must be"):
        model_config("llama3-tiny", rope_freq={"factor": 2.0})


def test_every_model_shares_one_generate():
    from fastgpt.models.generation import Generation

    for cls in (fastgpt.GPTModel, Llama3Model, Qwen3Model, Gemma3Model):
        assert cls.generate is Generation.generate and cls.new_kv_cache is Generation.new_kv_cache, cls
    model = build_model("qwen3-tiny", vocab_size=VOCAB).set_backend("naive")
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"naive"}


@pytest.mark.parametrize("name", ["llama3-tiny", "qwen3-tiny", "gemma3-tiny"])
def test_laptop_configs_generate_with_and_without_cache(name):
    model = build_model(name, backend="cpu", vocab_size=VOCAB)
    prompt = token_batch(2, 4)
    out = model.generate(prompt, max_new_tokens=20)  # gemma3-tiny: past its window of 16
    assert out.shape == (2, 24) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=20, use_cache=False))
    eos = int(out[0, 6])  # row 0 emits it by step 3 at the latest; a row that does repeats it
    stopped = model.generate(prompt, max_new_tokens=20, eos_id=[VOCAB - 1, eos])
    first = int(torch.isin(stopped[0, 4:], torch.tensor([VOCAB - 1, eos])).nonzero()[0]) + 4
    assert first <= 6 and torch.equal(stopped[0, :first], out[0, :first])
    assert (stopped[0, first:] == stopped[0, first]).all()


@pytest.mark.parametrize("name", ["tiny", "llama3-tiny", "gemma3-tiny"])
def test_static_decode_steps_are_one_compiled_graph(name):
    """generate's decode steps write the KV cache in place and keep every shape static: under
    torch.compile(fullgraph=True) all of them, in two generate calls, run one graph (a recompile is an
    error here), and the tokens equal eager decoding's and the uncached loop's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = build_model(name, backend="cpu", vocab_size=VOCAB)  # gemma3-tiny: sliding layers of window 16
    prompt = token_batch(2, 5)
    eager = model.generate(prompt, max_new_tokens=20)
    assert torch.equal(eager, model.generate(prompt, max_new_tokens=20, use_cache=False))
    torch._dynamo.reset()
    counters.clear()
    model.compile_decode(backend="aot_eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(model.generate(prompt, max_new_tokens=20), eager)
            model.generate(prompt.flip(1), max_new_tokens=20)
    finally:
        model._compiled_decode = None
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1


def test_static_decode_step_writes_the_cache_in_place():
    model = build_model("llama3-tiny", backend="cpu", vocab_size=VOCAB).eval()
    prompt = token_batch(2, 6)
    cache = model.new_kv_cache(2, 10)
    storage = [(c.keys.data_ptr(), c.values.data_ptr()) for c in cache]
    with torch.no_grad():
        model(prompt, cache)
        step = model.decode_step(prompt[:, -1:], cache)
        full = model(torch.cat([prompt, prompt[:, -1:]], dim=1))
    assert [c.length for c in cache] == [7] * len(cache)
    assert [(c.keys.data_ptr(), c.values.data_ptr()) for c in cache] == storage
    assert not cache[0].keys[:, :, 7:].any()  # nothing written past the step's position
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for _ in range(3):
            model.decode_step(prompt[:, -1:], cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            model.decode_step(prompt[:, -1:], cache)
        with pytest.raises(ValueError, match="one token per sequence"):
            model(prompt, cache, torch.tensor([3]))


def test_book_names_load(tmp_path):
    """The book's state_dict names: Llama 3's are ours (torch.nn.RMSNorm says weight); Qwen 3's
    and Gemma 3's RMSNorm say `scale`, and Gemma 3's block list is `blocks`."""
    llama = build_model("llama3-tiny", vocab_size=VOCAB)
    block = {"att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
             "ff.fc1.weight", "ff.fc2.weight", "ff.fc3.weight", "norm1.weight", "norm2.weight"}
    assert set(llama.state_dict()) == ({"tok_emb.weight", "final_norm.weight", "out_head.weight"}
                                       | {f"trf_blocks.{i}.{name}" for i in range(2) for name in block})
    for name in ("qwen3-tiny", "gemma3-tiny"):
        source = randomise(build_model(name, vocab_size=VOCAB), seed=5)
        book = {key.removesuffix("weight") + "scale" if "norm" in key else key: value
                for key, value in source.state_dict().items()}
        if name == "gemma3-tiny":
            book = {key.replace("trf_blocks.", "blocks."): value for key, value in book.items()}
        assert "final_norm.scale" in book and "trf_blocks.0.att.q_norm.weight" not in book
        target = load_book_state_dict(build_model(name, vocab_size=VOCAB), book)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
        del book["final_norm.scale"]
        with pytest.raises(KeyError, match="missing key 'final_norm.scale'"):
            load_book_state_dict(build_model(name, vocab_size=VOCAB), book)
    # fastgpt checkpoints keep the family.
    fastgpt.save_checkpoint(target, tmp_path / "gemma.pt")
    loaded = fastgpt.load_checkpoint(str(tmp_path / "gemma.pt"), backend="naive")
    assert type(loaded) is Gemma3Model and loaded.cfg == target.cfg
    prompt = token_batch(1, 20)
    with torch.no_grad():
        assert torch.allclose(loaded(prompt), target.set_backend("naive")(prompt), atol=1e-5)


# ---- clear errors --------------------------------------------------------------------------

def _copy_with(ref, tmp_path, tensors=None, config=None):
    tmp_path.mkdir()
    tensors = load_file(ref.dir / "model.safetensors") if tensors is None else tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    config = json.loads((ref.dir / "config.json").read_text()) if config is None else config
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_bad_checkpoints_name_the_tensor(ref, tmp_path):
    tensors = load_file(ref.dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="missing key 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(_copy_with(ref, tmp_path / "missing", tensors))
    tensors = load_file(ref.dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    kv = ref.hf.config.num_key_value_heads * ref.hf.config.head_dim
    with pytest.raises(ValueError, match=rf"'model.layers.0.self_attn.k_proj.weight': expected \({kv}, 64\), "
                                         rf"got \({4 * ref.hf.config.head_dim}, 64\)"):
        load_pretrained(_copy_with(ref, tmp_path / "shape", tensors))
    tensors = load_file(ref.dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(4 * ref.hf.config.head_dim)
    with pytest.raises(KeyError, match="unexpected key 'model.layers.0.self_attn.q_proj.bias'"):
        load_pretrained(_copy_with(ref, tmp_path / "unexpected", tensors))
    config = json.loads((ref.dir / "config.json").read_text())
    config["tie_word_embeddings"] = False
    if ref.family != "qwen3":  # a tied checkpoint has no lm_head
        with pytest.raises(KeyError, match="missing key 'lm_head.weight'.*tie_word_embeddings=false"):
            load_pretrained(_copy_with(ref, tmp_path / "untied", config=config))


def test_unsupported_configs_are_refused(tmp_path):
    ref_dir = tmp_path / "llama"
    hf_model("llama3").save_pretrained(ref_dir)
    config = json.loads((ref_dir / "config.json").read_text())

    def write(name, **changes):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**config, **changes}))
        (path / "model.safetensors").write_bytes((ref_dir / "model.safetensors").read_bytes())
        return str(path)

    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        load_pretrained(write("act", hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_pretrained(write("yarn", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="model_type='mistral'.*not supported.*LlamaForCausalLM"):
        load_pretrained(write("mistral", model_type="mistral", architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match="image-text models"):
        load_pretrained(write("gemma_mm", model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]))
    with pytest.raises(ValueError, match="is not Qwen3ForCausalLM"):
        load_qwen3(str(ref_dir))
    # The Hub's older config.json spelling (rope_theta + rope_scaling) reads the same.
    scaling = {k: v for k, v in config["rope_parameters"].items() if k != "rope_theta"}
    old = write("old", rope_parameters=None, rope_theta=500_000.0, rope_scaling=scaling)
    assert load_pretrained(old).cfg == load_pretrained(str(ref_dir)).cfg
    assert load_pretrained(old).cfg["rope_freq"]["original_context_length"] == 16
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["llama3-tiny", "gemma3-tiny"])
def test_gradients_equal_the_float64_oracle(name):
    """The fused backward (attention with GQA / window, rms_norm, add_rms_norm) trains these
    models: loss and every gradient on the cpu backend are the float64 naive model's."""
    from checks import assert_close

    torch.manual_seed(0)
    model = randomise(build_model(name, backend="cpu", vocab_size=VOCAB, context_length=32), seed=3)
    oracle = build_model(name, backend="naive", vocab_size=VOCAB, context_length=32).double()
    oracle.load_state_dict(model.state_dict())
    inputs, targets = token_batch(2, 24, seed=2), token_batch(2, 24, seed=3)
    losses = []
    for m in (model, oracle):
        loss = torch.nn.functional.cross_entropy(m(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss)
    assert_close(losses[0].detach(), losses[1].detach(), what=f"{name} loss")
    for (key, p), p64 in zip(model.named_parameters(), oracle.parameters()):
        assert p.grad is not None, key
        assert_close(p.grad, p64.grad, what=f"grad of {key}")
