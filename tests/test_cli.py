"""The `fastgpt` command line: info, generate, and the bench/train delegations."""
import os
import subprocess
import sys
import types

import pytest
import torch

import fastgpt
from fastgpt.cli import main

TINY_JSON = '{"emb_dim": 32, "n_heads": 2, "n_layers": 1, "context_length": 64}'


@pytest.fixture
def offline_vocab(shared_data, monkeypatch):
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", os.path.join(shared_data, "gpt2.tiktoken"))


def test_info_names_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("naive", "sdpa", "cpu", "cuda", "triton"):
        assert f"\n  {name} " in out
    assert f"torch {torch.__version__}" in out and "triton " in out
    assert "auto picks:" in out and f"cpu tensors -> {fastgpt.info()['auto']['picks']['cpu']}" in out
    for name, entry in fastgpt.info().items():
        if name != "auto" and entry["reason"]:
            assert entry["reason"] in out  # every unavailable backend says why


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "fastgpt", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout and "sdpa" in result.stdout


def test_generate_with_random_weights_warns(offline_vocab, capsys):
    argv = ["generate", "Hello, I am", "--config", TINY_JSON, "--max-new-tokens", "3", "--backend", "sdpa",
            "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and "--weights" in err
    assert out.startswith("Hello, I am") and len(out.rstrip("\n")) > len("Hello, I am")
    assert main(argv + ["--temperature", "1.0", "--top-k", "50", "--seed", "3"]) == 0
    sampled = capsys.readouterr().out
    assert main(argv + ["--temperature", "1.0", "--top-k", "50", "--seed", "3"]) == 0
    assert capsys.readouterr().out == sampled  # --seed makes sampling repeatable


def test_generate_with_weights_prints_the_models_continuation(offline_vocab, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    tok = fastgpt.get_tokenizer()
    model = fastgpt.load_gpt2(str(tmp_path / "hf"))
    prompt = torch.tensor([tok.encode("The verdict")])
    expected = tok.decode(model.generate(prompt, max_new_tokens=4, eos_id=tok.eot_token)[0].tolist())
    assert main(["generate", "The verdict", "--weights", str(tmp_path / "hf"), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "RANDOM" not in err
    fastgpt.save_checkpoint(model, tmp_path / "gpt.pt")  # a fastgpt checkpoint file works too
    assert main(["generate", "The verdict", "--weights", str(tmp_path / "gpt.pt"), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_rejects_a_bad_config(offline_vocab):
    with pytest.raises(SystemExit, match="neither a config name"):
        main(["generate", "hi", "--config", "gpt2-huge"])
    with pytest.raises(SystemExit, match="--config: GPT config has unknown keys emb"):
        main(["generate", "hi", "--config", '{"emb": 32}'])


def fake_module(monkeypatch, name, calls):
    module = types.ModuleType(name)
    module.main = lambda argv: calls.append((name, argv))
    monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("argv, module, passed", [
    (["train", "--epochs", "3", "data.txt"], "fastgpt.train", ["--epochs", "3", "data.txt"]),
    (["bench", "attention", "--max-T", "4096", "--help"], "fastgpt.bench.attention",
     ["--max-T", "4096", "--help"]),
    (["bench", "context", "--max-T", "4096"], "fastgpt.bench.attention", ["--max-T", "4096"]),  # the alias
    (["bench", "layernorm"], "fastgpt.bench.layer_norm", []),
    (["bench", "rmsnorm", "--dtype", "bfloat16"], "fastgpt.bench.rms_norm", ["--dtype", "bfloat16"]),
    (["bench", "model", "--arch", "qwen3"], "fastgpt.bench.model", ["--arch", "qwen3"]),
    (["bench", "gpt", "--backend", "cpu"], "fastgpt.bench.model", ["--backend", "cpu"]),  # the alias
])
def test_bench_and_train_get_their_argv_untouched(monkeypatch, argv, module, passed):
    calls = []
    fake_module(monkeypatch, module, calls)
    assert main(argv) == 0
    assert calls == [(module, passed)]


def test_missing_delegate_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastgpt.train", None)  # as if fastgpt/train.py were absent
    with pytest.raises(SystemExit, match="fastgpt.train is not available"):
        main(["train", "--epochs", "1"])
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_generate_with_a_laptop_config(offline_vocab, capsys, monkeypatch, name):
    """`fastgpt generate --config tiny` builds the registry's tiny model (random weights, with the warning)."""
    built = []
    original_init = fastgpt.GPTModel.__init__

    def recording_init(self, cfg, backend="auto"):
        built.append(dict(cfg))
        original_init(self, cfg, backend=backend)

    monkeypatch.setattr(fastgpt.GPTModel, "__init__", recording_init)
    assert main(["generate", "Every effort", "--config", name, "--max-new-tokens", "4", "--backend", "naive",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert built == [fastgpt.models.model_config(name)] and built[0]["n_layers"] in (2, 4)
    assert "RANDOM weights" in err
    tok = fastgpt.get_tokenizer()
    assert out.startswith("Every effort") and len(tok.encode(out.rstrip("\n"))) == len(tok.encode("Every effort")) + 4


def test_one_config_registry_for_train_generate_and_bench():
    """train, generate and the model benchmark resolve config names through fastgpt.models alone."""
    from fastgpt import cli, models, train
    from fastgpt.bench import model

    assert train.model_config is models.model_config and model.model_config is models.model_config
    assert train.CONFIG_NAMES is models.CONFIG_NAMES and model.ALL_CONFIG_NAMES is models.ALL_CONFIG_NAMES
    assert model.ARCHS == tuple(models.FAMILIES) == ("gpt2", "llama3", "qwen3", "gemma3")
    for device, defaults in model.DEFAULT_CONFIGS.items():  # each --arch's default config is of that family
        assert set(defaults) == set(model.ARCHS), device
        for family, (name, _) in defaults.items():
            assert models.family_of(name) == family, (device, name)
    for name in models.CONFIG_NAMES:
        assert cli._resolve_config(name) == models.model_config(name) == models.CONFIGS[name], name
    assert cli._resolve_config('{"n_layers": 1}') == models.model_config("gpt2-small", n_layers=1)
    # The registry is the only place these names live (test_layers checks no other dict of config keys exists).
    for module in (train, cli, model):
        assert not hasattr(module, "SMALL_CONFIGS") and not hasattr(module, "GPT2_CONFIGS"), module.__name__


def word_tokenizer(vocab_size):
    """A tokenizer.json of vocab_size words (w3, w4, ...; 0-2 special), built offline with `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_generate_picks_the_architecture_and_tokenizer_json(tmp_path, capsys, family):
    """--weights DIR of a Llama / Qwen 3 / Gemma 3 checkpoint: the model config.json names, its
    tokenizer.json, its eos id; the printed text is transformers' greedy continuation."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=32, eos_token_id=5)
    config, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                   "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                   "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[family]
    extra = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]} if family == "gemma3" else {}
    torch.manual_seed(0)
    hf = cls(config(**common, **extra)).eval()
    hf.save_pretrained(tmp_path)
    tokenizer = word_tokenizer(64)
    argv = ["generate", "w7 w9 w11 w3", "--weights", str(tmp_path), "--max-new-tokens", "6", "--device", "cpu",
            "--backend", "cpu"]
    with pytest.raises(SystemExit, match=r"has no tokenizer.json; a (llama3|qwen3|gemma3) model needs"):
        main(argv)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("w7 w9 w11 w3").ids])
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=5, pad_token_id=5)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(expected[0].tolist(), skip_special_tokens=False) + "\n" and "RANDOM" not in err


def test_generate_with_a_rope_laptop_config(offline_vocab, capsys, tmp_path):
    assert main(["generate", "Every effort", "--config", "gemma3-tiny", "--max-new-tokens", "3", "--backend", "naive",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and out.startswith("Every effort")
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(SystemExit, match="model_type='bert'.*is not supported; fastgpt loads GPT2LMHeadModel"):
        main(["generate", "hi", "--weights", str(tmp_path)])
