"""Weight loading, checked against Hugging Face transformers' GPT2LMHeadModel with the same
random weights: same logits (against HF run in float64), same greedy tokens."""
import json
import os

import pytest
import torch
from checks import assert_close
from conftest import HAS_GPU, require_backend

import book_model
import fastgpt

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (installed with transformers)

HF_CONFIG = dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=1000,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
LOADER_BACKENDS = ["naive", "sdpa", "cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                   pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
                       not HAS_GPU, reason="model tests run Triton on a GPU only")])]


def random_hf_model(seed=0, **overrides):
    """GPT2LMHeadModel with every parameter N(0, 0.2): far from the default init, so a
    loader that drops a bias, a layer norm or a transpose changes the logits visibly."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**HF_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def save_bin(model, path):
    """The pre-safetensors format: config.json + pytorch_model.bin (a torch.save'd state_dict)."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """(HF model, {format: checkpoint dir}, prompt, float64 HF logits, HF greedy tokens)."""
    hf = random_hf_model()
    root = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(root / "safetensors")
    save_bin(hf, root / "bin")
    prompt = torch.randint(0, HF_CONFIG["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits64 = hf.double()(prompt).logits  # (2, 20, vocab)
        hf.float()
        greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    return hf, {"safetensors": root / "safetensors", "bin": root / "bin"}, prompt, logits64, greedy


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_logits_match_transformers(hf_reference, fmt, backend):
    device = require_backend(backend)
    _, dirs, prompt, logits64, _ = hf_reference
    model = fastgpt.load_gpt2(str(dirs[fmt]), backend=backend).to(device)
    with torch.no_grad():
        logits = model(prompt.to(device))
    assert logits.dtype == torch.float32
    assert_close(logits.cpu(), logits64, what=f"{fmt} {backend} logits vs transformers (float64)")


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_greedy_tokens_match_transformers(hf_reference, backend, use_cache):
    device = require_backend(backend)
    _, dirs, prompt, _, greedy = hf_reference
    model = fastgpt.load_gpt2(str(dirs["safetensors"]), backend=backend).to(device)
    out = model.generate(prompt.to(device), max_new_tokens=20, use_cache=use_cache)
    assert torch.equal(out.cpu(), greedy)


def test_loaded_model_is_gpt2_shaped(hf_reference):
    hf, dirs, *_ = hf_reference
    model = fastgpt.load_gpt2(str(dirs["safetensors"]), backend="sdpa")
    assert model.cfg == {"vocab_size": 1000, "context_length": 128, "emb_dim": 64, "n_heads": 4,
                         "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2
    assert sum(p.numel() for p in model.parameters()) == hf.num_parameters()
    assert not model.training and model.trf_blocks[0].att.backend == "sdpa"
    half = fastgpt.load_gpt2(str(dirs["bin"]), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_untied_output_head(tmp_path):
    hf = random_hf_model(seed=3, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    model = fastgpt.load_gpt2(str(tmp_path), backend="naive")
    assert model.out_head.weight is not model.tok_emb.weight
    prompt = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model(prompt), hf.double()(prompt).logits)


def test_hub_layout_sharded_with_mask_buffers(hf_reference, tmp_path):
    """The Hub's gpt2 files: keys without the "transformer." prefix, the old causal-mask
    buffers (attn.bias, attn.masked_bias) saved alongside, here split over two shards."""
    _, dirs, prompt, logits64, _ = hf_reference
    tensors = {key.removeprefix("transformer."): t
               for key, t in load_file(dirs["safetensors"] / "model.safetensors").items()}
    T = HF_CONFIG["n_positions"]
    for i in range(HF_CONFIG["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({key: tensors[key].contiguous() for key in shard_keys}, tmp_path / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((dirs["safetensors"] / "config.json").read_text())
    model = fastgpt.load_gpt2(str(tmp_path), backend="naive")
    with torch.no_grad():
        assert_close(model(prompt), logits64, what="hub-layout logits vs transformers (float64)")


# ---- clear errors --------------------------------------------------------------------------

def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        fastgpt.load_gpt2(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        fastgpt.load_gpt2(str(tmp_path))
    random_hf_model().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastgpt.load_gpt2(str(tmp_path))


def test_missing_key_is_named(hf_reference, tmp_path):
    _, dirs, *_ = hf_reference
    tensors = load_file(dirs["safetensors"] / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((dirs["safetensors"] / "config.json").read_text())
    with pytest.raises(KeyError, match="missing key 'h.1.mlp.c_fc.bias'"):
        fastgpt.load_gpt2(str(tmp_path))


def test_shape_mismatch_names_key_and_shapes(hf_reference, tmp_path):
    _, dirs, *_ = hf_reference
    config = json.loads((dirs["safetensors"] / "config.json").read_text())
    config["n_positions"] = 64  # the checkpoint's wpe has 128 rows
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((dirs["safetensors"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"'wpe.weight': expected \(64, 64\), got \(128, 64\)"):
        fastgpt.load_gpt2(str(tmp_path))


def test_unsupported_architecture_is_refused(tmp_path):
    random_hf_model(activation_function="relu").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        fastgpt.load_gpt2(str(tmp_path))


# ---- the book's state_dict and fastgpt checkpoints ------------------------------------------

TINY = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": False}


def book_state_dict(seed):
    """The state_dict of the book's own GPTModel (tests/book_model.py), whose blocks
    register a (T, T) causal-mask buffer each."""
    torch.manual_seed(seed)
    return book_model.GPTModel(TINY).state_dict()


def test_book_state_dict_gives_the_books_logits():
    torch.manual_seed(5)
    book = book_model.GPTModel(TINY).eval()
    assert "trf_blocks.0.att.mask" in book.state_dict()
    model = fastgpt.load_book_state_dict(fastgpt.GPTModel(TINY, backend="naive"), book.state_dict()).eval()
    assert list(model.buffers()) == []
    prompt = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # float32 against the book's model run in float64
        assert_close(model(prompt), book.double()(prompt), what="logits vs the book's GPTModel")


def test_book_state_dict_errors():
    state = book_state_dict(seed=5)
    del state["trf_blocks.0.norm2.shift"]
    with pytest.raises(KeyError, match="missing key 'trf_blocks.0.norm2.shift'"):
        fastgpt.load_book_state_dict(fastgpt.GPTModel(TINY), state)
    state = book_state_dict(seed=5)
    state["out_head.weight"] = state["out_head.weight"][:, :16]
    with pytest.raises(ValueError, match=r"'out_head.weight': expected \(97, 32\), got \(97, 16\)"):
        fastgpt.load_book_state_dict(fastgpt.GPTModel(TINY), state)
    state = book_state_dict(seed=5)
    state["trf_blocks.0.att.W_query.bias"] = torch.zeros(32)  # a qkv_bias=True checkpoint
    with pytest.raises(KeyError, match="unexpected key 'trf_blocks.0.att.W_query.bias'"):
        fastgpt.load_book_state_dict(fastgpt.GPTModel(TINY), state)


def test_checkpoint_round_trip(hf_reference, tmp_path):
    _, dirs, *_ = hf_reference
    model = fastgpt.load_gpt2(str(dirs["safetensors"]), backend="naive")
    fastgpt.save_checkpoint(model, tmp_path / "gpt.pt")
    loaded = fastgpt.load_checkpoint(str(tmp_path / "gpt.pt"), backend="sdpa")
    assert loaded.cfg == model.cfg and loaded.out_head.weight is loaded.tok_emb.weight
    assert loaded.trf_blocks[1].norm2.backend == "sdpa"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.manual_seed(0)
    untied = fastgpt.GPTModel(TINY)
    fastgpt.save_checkpoint(untied, tmp_path / "untied.pt")
    reloaded = fastgpt.load_checkpoint(str(tmp_path / "untied.pt"), dtype=torch.float64)
    assert reloaded.out_head.weight is not reloaded.tok_emb.weight
    assert torch.equal(reloaded.out_head.weight, untied.out_head.weight.double())
    with pytest.raises(FileNotFoundError, match="save_checkpoint"):
        fastgpt.load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_in_the_books_names_still_loads(tmp_path):
    """fastgpt 0.1 wrote checkpoints with the book's layer norm names (scale/shift): they still load."""
    torch.manual_seed(6)
    model = fastgpt.GPTModel(TINY, backend="naive").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # non-trivial norms: a dropped scale or shift changes the logits
    old_state = fastgpt.nn.to_book_state_dict(model)
    assert "final_norm.scale" in old_state and "final_norm.weight" not in old_state
    torch.save({"config": dict(TINY), "state_dict": old_state, "tied": False}, tmp_path / "old.pt")
    loaded = fastgpt.load_checkpoint(str(tmp_path / "old.pt"), backend="naive")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    del old_state["trf_blocks.1.norm1.scale"]
    torch.save({"config": dict(TINY), "state_dict": old_state}, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match="missing key 'trf_blocks.1.norm1.scale'"):
        fastgpt.load_checkpoint(str(tmp_path / "broken.pt"))


def test_load_book_state_dict_takes_fastgpt_names_too():
    torch.manual_seed(7)
    source = fastgpt.GPTModel(TINY)
    target = fastgpt.load_book_state_dict(fastgpt.GPTModel(TINY), source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_pretrained_picks_gpt2_from_config_json(hf_reference):
    _, dirs, prompt, logits64, _ = hf_reference
    assert fastgpt.weights.architecture_of(str(dirs["safetensors"])) == "gpt2"
    model = fastgpt.load_pretrained(str(dirs["bin"]), backend="naive")
    assert type(model) is fastgpt.GPTModel and model.out_head.weight is model.tok_emb.weight
    with torch.no_grad():
        assert_close(model(prompt), logits64, what="load_pretrained GPT-2 logits vs transformers (float64)")
