"""GPT-2's byte-pair tokenizer (tiktoken), online or from a local vocabulary file.

tiktoken.get_encoding("gpt2") downloads the vocabulary once (then caches it). On a
machine without network, point FASTGPT_GPT2_VOCAB at a GPT-2 ranks file in tiktoken
format (one "base64-token rank" pair per line) and the same encoding is built from it.
"""
from __future__ import annotations

import functools
import os

VOCAB_ENV = "FASTGPT_GPT2_VOCAB"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex, as released by OpenAI (tiktoken ships a faster equivalent).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB_SIZE = 50257  # 50256 byte-pair merges + <|endoftext|>


@functools.lru_cache(maxsize=None)
def _from_file(path: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{VOCAB_ENV}={path}: no such file; it should be GPT-2's ranks file "
                                f"in tiktoken format (gpt2.tiktoken)")
    ranks = load_tiktoken_bpe(path)
    if len(ranks) != GPT2_VOCAB_SIZE - 1:
        raise ValueError(f"{VOCAB_ENV}={path} has {len(ranks)} tokens; GPT-2's ranks file has "
                         f"{GPT2_VOCAB_SIZE - 1} (plus {ENDOFTEXT} = {GPT2_VOCAB_SIZE - 1})")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_VOCAB_SIZE - 1},
                             explicit_n_vocab=GPT2_VOCAB_SIZE)


def get_tokenizer():
    """tiktoken's GPT-2 encoding: encode(text, allowed_special={"<|endoftext|>"}), decode(ids), eot_token."""
    path = os.environ.get(VOCAB_ENV)
    if path:
        return _from_file(path)
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # noqa: BLE001 - tiktoken raises network errors of many kinds
        raise RuntimeError(f"could not load the GPT-2 vocabulary ({type(error).__name__}: {error}); without "
                           f"network access, set {VOCAB_ENV}=/path/to/gpt2.tiktoken (GPT-2's ranks file in "
                           f"tiktoken format)") from error
