"""GPT-2 tokenizer from the offline ranks file (no network in tests)."""
import os

import pytest

from fastgpt import get_tokenizer


@pytest.fixture
def offline_vocab(shared_data, monkeypatch):
    path = os.path.join(shared_data, "gpt2.tiktoken")
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", path)
    return path


def test_encodes_as_gpt2(offline_vocab):
    tok = get_tokenizer()
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    # The book's chapter 2 example, with <|endoftext|> allowed.
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680,
        27271, 13]
    assert tok.eot_token == 50256 and tok.n_vocab == 50257
    with pytest.raises(ValueError):  # special tokens stay disallowed unless asked for, as in tiktoken
        tok.encode("<|endoftext|>")


def test_round_trip(offline_vocab, shared_data):
    tok = get_tokenizer()
    with open(os.path.join(shared_data, "the-verdict.txt"), encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # "I HAD always thought Jack Gisburn rather", as the book prints it
    assert ids[:10] == [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138]
    odd = "naïve café — 東京 😀\n\n  spaces\tand tabs 12345"
    assert tok.decode(tok.encode(odd)) == odd


def test_missing_vocab_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", str(tmp_path / "gpt2.tiktoken"))
    with pytest.raises(FileNotFoundError, match="FASTGPT_GPT2_VOCAB=.*no such file"):
        get_tokenizer()


def test_wrong_vocab_file(monkeypatch, tmp_path):
    path = tmp_path / "small.tiktoken"
    path.write_text("IQ== 0\nIg== 1\n")
    monkeypatch.setenv("FASTGPT_GPT2_VOCAB", str(path))
    with pytest.raises(ValueError, match="has 2 tokens; GPT-2's ranks file has 50256"):
        get_tokenizer()


def test_without_network_or_file_says_how_to_fix(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv("FASTGPT_GPT2_VOCAB", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="set FASTGPT_GPT2_VOCAB=/path/to/gpt2.tiktoken"):
        get_tokenizer()
