"""Loading weights into fastgpt.GPTModel: Hugging Face GPT-2 checkpoints, the book's
state_dict, and fastgpt's own checkpoints (config + state_dict in one file).

Every loader checks the whole state_dict against the model before copying anything:
a missing or unexpected key, or a shape mismatch, raises a KeyError/ValueError that
names the key and the expected and actual shapes. State_dicts in the book's names
(layer norm scale/shift, as the book's GPTModel and fastgpt checkpoints before 0.2
have them) load as well as fastgpt's own (weight/bias).
"""
from __future__ import annotations

import json
import os

import torch

from .models import GPTModel, check_config
from .nn import to_book_state_dict

# Hugging Face GPT-2 settings the book's architecture implements; anything else is refused.
_HF_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # the tanh GELU
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}
# Causal-mask buffers that older transformers versions saved; the model has none.
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _tie_output_head(model: GPTModel) -> None:
    """GPT-2's output head is the token embedding matrix (one Parameter, counted once)."""
    model.out_head.weight = model.tok_emb.weight


def _expected_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict in the names `state_dict` uses: the book's when its final
    norm is `scale` / `shift`, else fastgpt's (the model's modules load either)."""
    ours = model.state_dict()
    return to_book_state_dict(model, ours) if "final_norm.scale" in state_dict else ours


def _check_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = _expected_state_dict(model, state_dict)
    missing = [key for key in expected if key not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(f"{source}: missing key {missing[0]!r}{more}")
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise KeyError(f"{source}: unexpected key {unexpected[0]!r}; the model has no such parameter")
    for key, want in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{source}: shape mismatch for {key!r}: expected {_shape(want.shape)}, "
                             f"got {_shape(got.shape)}")


def _build_on_meta(cfg: dict, backend: str) -> GPTModel:
    """The model's modules without allocating or initialising weights: the loader assigns them."""
    with torch.device("meta"):
        return GPTModel(cfg, backend=backend)


def _assign(model: GPTModel, state_dict: dict[str, torch.Tensor], source: str, tied: bool,
            dtype: torch.dtype | None) -> GPTModel:
    """Makes the tensors of `state_dict` (converted to dtype, unless None) the model's parameters."""
    _check_state_dict(model, state_dict, source)
    model.load_state_dict({key: (t if dtype is None else t.to(dtype)).contiguous()
                           for key, t in state_dict.items()}, assign=True)
    if tied:
        _tie_output_head(model)
    return model.eval()


# ---- Hugging Face GPT-2 ------------------------------------------------------------------

def _read_hf_config(path: str) -> tuple[dict, dict]:
    """(the book's config, the HF config) from path/config.json."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face GPT-2 directory has config.json "
                                f"next to model.safetensors or pytorch_model.bin")
    with open(config_path) as f:
        hf = json.load(f)
    for key, allowed in _HF_REQUIRED.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{config_path}: {key}={hf[key]!r} is not supported; the book's GPT-2 needs "
                             f"{' or '.join(map(repr, allowed))}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{config_path}: n_inner={hf['n_inner']} is not supported; the feed-forward width "
                         f"is 4 * n_embd = {4 * hf['n_embd']}")
    cfg = {
        "vocab_size": hf["vocab_size"], "context_length": hf["n_positions"], "emb_dim": hf["n_embd"],
        "n_heads": hf["n_head"], "n_layers": hf["n_layer"],
        # One dropout rate in the book's model: the residual one (GPT-2 uses 0.1 everywhere).
        "drop_rate": hf.get("resid_pdrop", 0.1), "qkv_bias": True,
    }
    return check_config(cfg), hf


def _read_hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: one file or shards listed by an *.index.json."""
    present = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}")
    name = present[0]
    if name.endswith(".index.json"):
        with open(os.path.join(path, name)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [name]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        file_path = os.path.join(path, file)
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            tensors.update(load_file(file_path))
        else:
            tensors.update(torch.load(file_path, map_location="cpu", weights_only=True))
    return tensors


def _convert_hf(model: GPTModel, hf_tensors: dict[str, torch.Tensor], tied: bool, source: str) -> dict:
    """HF GPT-2 names and layouts -> the model's. HF's Conv1D stores weights as (in, out),
    nn.Linear as (out, in), hence the transposes; c_attn holds query, key and value side by side."""
    hf = {key.removeprefix("transformer."): t for key, t in hf_tensors.items()
          if not key.endswith(_HF_IGNORED_SUFFIXES)}
    expected = model.state_dict()
    emb = model.cfg["emb_dim"]

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in hf:
            raise KeyError(f"{source}: missing key {key!r}")
        t = hf.pop(key)
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: shape mismatch for {key!r}: expected {_shape(shape)}, got {_shape(t.shape)}")
        return t

    def linear(hf_name: str, name: str) -> dict:
        out_features, in_features = expected[f"{name}.weight"].shape
        return {f"{name}.weight": take(f"{hf_name}.weight", (in_features, out_features)).t(),
                f"{name}.bias": take(f"{hf_name}.bias", (out_features,))}

    ours = {"tok_emb.weight": take("wte.weight", tuple(expected["tok_emb.weight"].shape)),
            "pos_emb.weight": take("wpe.weight", tuple(expected["pos_emb.weight"].shape))}
    for i in range(model.cfg["n_layers"]):
        h, b = f"h.{i}", f"trf_blocks.{i}"
        qkv_weight = take(f"{h}.attn.c_attn.weight", (emb, 3 * emb))  # (in, [q | k | v])
        qkv_bias = take(f"{h}.attn.c_attn.bias", (3 * emb,))
        for part, w, bias in zip(("W_query", "W_key", "W_value"), qkv_weight.split(emb, dim=1),
                                 qkv_bias.split(emb)):
            ours[f"{b}.att.{part}.weight"], ours[f"{b}.att.{part}.bias"] = w.t(), bias
        ours.update(linear(f"{h}.attn.c_proj", f"{b}.att.out_proj"))
        ours.update(linear(f"{h}.mlp.c_fc", f"{b}.ff.layers.0"))
        ours.update(linear(f"{h}.mlp.c_proj", f"{b}.ff.layers.2"))
        for hf_norm, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            ours[f"{b}.{norm}.weight"] = take(f"{h}.{hf_norm}.weight", (emb,))
            ours[f"{b}.{norm}.bias"] = take(f"{h}.{hf_norm}.bias", (emb,))
    ours["final_norm.weight"] = take("ln_f.weight", (emb,))
    ours["final_norm.bias"] = take("ln_f.bias", (emb,))
    lm_head = hf.pop("lm_head.weight", None)
    if tied:
        ours["out_head.weight"] = ours["tok_emb.weight"]
    elif lm_head is None:
        raise KeyError(f"{source}: missing key 'lm_head.weight' (config.json says tie_word_embeddings=false)")
    else:
        ours["out_head.weight"] = lm_head
    if hf:
        raise KeyError(f"{source}: unexpected key {next(iter(hf))!r}; not part of GPT-2")
    return ours


def load_gpt2(path: str, backend: str = "auto", dtype: torch.dtype | None = None) -> GPTModel:
    """A GPTModel with the weights of the Hugging Face GPT-2 checkpoint directory `path`
    (config.json + model.safetensors or pytorch_model.bin, possibly sharded).

    The config comes from config.json (qkv_bias True, drop_rate = resid_pdrop); the
    output head is tied to the token embedding unless tie_word_embeddings is false.
    dtype: the parameters' dtype (default float32). Returned on the CPU, in eval mode.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: load_gpt2 takes a Hugging Face GPT-2 directory "
                                f"(config.json + model.safetensors or pytorch_model.bin)")
    cfg, hf_config = _read_hf_config(path)
    tied = hf_config.get("tie_word_embeddings", True)
    model = _build_on_meta(cfg, backend)
    state_dict = _convert_hf(model, _read_hf_tensors(path), tied, source=path)
    return _assign(model, state_dict, path, tied, torch.float32 if dtype is None else dtype)


# ---- the book's state_dict and fastgpt checkpoints ---------------------------------------

def load_book_state_dict(model: GPTModel, state_dict: dict[str, torch.Tensor]) -> GPTModel:
    """Copies a state_dict of the book's GPTModel into `model` (the book's names: layer norm
    scale/shift, which land in weight/bias). The book's MultiHeadAttention registers a
    (T, T) `mask` buffer per block; those are ignored. fastgpt.nn.to_book_state_dict
    goes the other way."""
    weights = {key: t for key, t in state_dict.items() if not key.endswith(".att.mask")}
    _check_state_dict(model, weights, "book state_dict")
    model.load_state_dict(weights)
    return model


def save_checkpoint(model: GPTModel, path: str) -> None:
    """Writes the model's config and state_dict to one file (torch.save)."""
    torch.save({"config": dict(model.cfg), "state_dict": model.state_dict(),
                "tied": model.out_head.weight is model.tok_emb.weight}, path)


def load_checkpoint(path: str, backend: str = "auto", dtype: torch.dtype | None = None) -> GPTModel:
    """The GPTModel saved by save_checkpoint(model, path), on the CPU, in eval mode;
    dtype: convert the parameters (default: keep the saved dtype)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a file written by fastgpt.save_checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not a fastgpt checkpoint (a dict with 'config' and 'state_dict')")
    model = _build_on_meta(checkpoint["config"], backend)
    return _assign(model, checkpoint["state_dict"], path, checkpoint.get("tied", False), dtype)
