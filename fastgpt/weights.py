"""Loading weights into fastgpt's models: Hugging Face checkpoints (GPT2LMHeadModel,
LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM: config.json + safetensors or .bin,
single or sharded with an index json), the book's state_dicts, and fastgpt's own
checkpoints (config + state_dict in one file).

load_pretrained(dir) picks the architecture from config.json (model_type, architectures);
load_gpt2 / load_llama3 / load_qwen3 / load_gemma3 take one each.

Every loader checks the whole state_dict against the model before copying anything:
a missing or unexpected key, or a shape mismatch, raises a KeyError/ValueError that
names the key (in the checkpoint's names) and the expected and actual shapes. State_dicts
in the book's names (layer norm scale/shift, RMSNorm scale, Gemma 3's `blocks`, as the
book's models and fastgpt checkpoints before 0.2 have them) load as well as fastgpt's own.
"""
from __future__ import annotations

import json
import os

import torch

from .models import MODEL_CLASSES, Gemma3Model, GPTModel, Llama3Model, Qwen3Model, check_config
from .models.blocks import RoPEModel
from .nn import RMSNorm, to_book_state_dict

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


def _tie_output_head(model) -> None:
    """The output head is the token embedding matrix (one Parameter, counted once), as in
    GPT-2, Llama 3.2, the smaller Qwen 3 and Gemma 3 checkpoints."""
    model.out_head.weight = model.tok_emb.weight


def _expected_state_dict(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict in the names `state_dict` uses: for GPT-2 the book's when its final
    norm is `scale` / `shift`, else fastgpt's; for the RoPE models an RMSNorm's `weight` as the
    book's `scale` when `state_dict` has RMSNorm scales, and Gemma 3's `trf_blocks` as the book's
    `blocks` when it has those (the model's modules load either)."""
    ours = model.state_dict()
    if isinstance(model, GPTModel):
        return to_book_state_dict(model, ours) if "final_norm.scale" in state_dict else ours
    norms = {name + ".weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    book_blocks = isinstance(model, Gemma3Model) and any(key.startswith("blocks.") for key in state_dict)
    renamed = ("trf_" + key if book_blocks and key.startswith("blocks.") else key for key in state_dict)
    book_norms = any(key.endswith(".scale") and key.removesuffix("scale") + "weight" in norms for key in renamed)
    expected = {}
    for key, value in ours.items():
        name = key.removesuffix("weight") + "scale" if book_norms and key in norms else key
        if book_blocks and name.startswith("trf_blocks."):
            name = "blocks." + name.removeprefix("trf_blocks.")
        expected[name] = value
    return expected


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


def _build_on_meta(cfg: dict, backend: str, family: str = "gpt2"):
    """The model's modules without allocating or initialising weights: the loader assigns them."""
    with torch.device("meta"):
        return MODEL_CLASSES[family](cfg, backend=backend)


def _assign(model, state_dict: dict[str, torch.Tensor], source: str, tied: bool, dtype: torch.dtype | None):
    """Makes the tensors of `state_dict` (converted to dtype, unless None) the model's parameters
    (and computes a RoPE model's tables, which are not part of it, on the CPU)."""
    _check_state_dict(model, state_dict, source)
    model.load_state_dict({key: (t if dtype is None else t.to(dtype)).contiguous()
                           for key, t in state_dict.items()}, assign=True)
    if tied:
        _tie_output_head(model)
    if isinstance(model, RoPEModel):
        model.reset_rope("cpu")
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


# ---- Hugging Face Llama 3, Qwen 3, Gemma 3 ---------------------------------------------------

# config.json model_type -> (our family, the architecture's name for messages)
HF_MODEL_TYPES = {"gpt2": ("gpt2", "GPT2LMHeadModel"), "llama": ("llama3", "LlamaForCausalLM"),
                  "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma3_text": ("gemma3", "Gemma3ForCausalLM")}
HF_ARCHITECTURES = {name: family for family, name in HF_MODEL_TYPES.values()}
_FAMILY_NAMES = {family: name for family, name in HF_MODEL_TYPES.values()}
# Our module names inside a block -> transformers' (model.layers.N.<name>).
_HF_BLOCK_NAMES = {"att.W_query": "self_attn.q_proj", "att.W_key": "self_attn.k_proj",
                   "att.W_value": "self_attn.v_proj", "att.out_proj": "self_attn.o_proj",
                   "att.q_norm": "self_attn.q_norm", "att.k_norm": "self_attn.k_norm",
                   "ff.fc1": "mlp.gate_proj", "ff.fc2": "mlp.up_proj", "ff.fc3": "mlp.down_proj"}
_HF_NORM_NAMES = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"}  # Llama / Qwen; Gemma's match
_HF_TOP_NAMES = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm", "out_head": "lm_head"}
_HF_IGNORED_ROPE_SUFFIX = ".rotary_emb.inv_freq"  # older transformers saved RoPE's inverse frequencies


def _read_config_json(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face model directory has config.json "
                                f"next to model.safetensors (or its shards and model.safetensors.index.json)")
    with open(config_path) as f:
        return json.load(f)


def architecture_of(path: str) -> str:
    """The fastgpt family (gpt2, llama3, qwen3, gemma3) of the HF checkpoint directory `path`,
    from config.json's model_type, else its architectures; a ValueError naming what is supported."""
    hf = _read_config_json(path)
    if hf.get("model_type") in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[hf["model_type"]][0]
    for architecture in hf.get("architectures") or ():
        if architecture in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[architecture]
    hint = (" (Gemma 3 4B and larger are image-text models: fastgpt loads the text-only Gemma3ForCausalLM, "
            "model_type gemma3_text)" if hf.get("model_type") == "gemma3" else "")
    raise ValueError(f"{os.path.join(path, 'config.json')}: model_type={hf.get('model_type')!r}, architectures="
                     f"{hf.get('architectures')!r} is not supported{hint}; fastgpt loads "
                     f"{', '.join(HF_ARCHITECTURES)}")


def _hf_rope(hf: dict, layer_type: str | None, config_path: str, default_theta: float) -> tuple[float, dict | None]:
    """(theta, our rope_freq) of transformers' RoPE settings: rope_theta + rope_scaling (older
    config.json files, the Hub's) or rope_parameters (transformers 5), per layer type for Gemma 3."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        theta, scaling = params.get("rope_theta", default_theta), params
    else:
        key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
        theta = hf.get(key, default_theta)
        scaling = None if layer_type == "sliding_attention" else hf.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return float(theta), {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                              "high_freq_factor": float(scaling["high_freq_factor"]),
                              "original_context_length": int(scaling["original_max_position_embeddings"])}
    raise ValueError(f"{config_path}: rope type {kind!r} is not supported; fastgpt implements default, "
                     f"linear and llama3 RoPE")


def _refuse(hf: dict, config_path: str, family: str, key: str, allowed: tuple) -> None:
    if key in hf and hf[key] not in allowed:
        raise ValueError(f"{config_path}: {key}={hf[key]!r} is not supported; fastgpt's {family} needs "
                         f"{' or '.join(map(repr, allowed))}")


def _rope_model_config(path: str, family: str) -> tuple[dict, dict]:
    """(our config, the HF config) of a Llama / Qwen 3 / Gemma 3 directory's config.json."""
    hf = _read_config_json(path)
    config_path = os.path.join(path, "config.json")
    name = _FAMILY_NAMES[family]
    if architecture_of(path) != family:
        raise ValueError(f"{config_path}: model_type={hf.get('model_type')!r} is not {name}; "
                         f"fastgpt.load_pretrained picks the loader from config.json")
    if family == "gemma3":
        _refuse(hf, config_path, family, "hidden_activation", ("gelu_pytorch_tanh",))  # GeGLU, tanh GELU
    else:
        _refuse(hf, config_path, family, "hidden_act", ("silu",))  # SwiGLU
    _refuse(hf, config_path, family, "mlp_bias", (False,))
    _refuse(hf, config_path, family, "use_sliding_window", (False,))  # Qwen 3's option
    _refuse(hf, config_path, family, "use_bidirectional_attention", (False, None))  # EmbeddingGemma's
    _refuse(hf, config_path, family, "attn_logit_softcapping", (None,))  # transformers' Gemma 3 ignores it
    heads = hf["num_attention_heads"]
    cfg = {"vocab_size": hf["vocab_size"], "context_length": hf["max_position_embeddings"],
           "emb_dim": hf["hidden_size"], "n_heads": heads, "n_layers": hf["num_hidden_layers"],
           "hidden_dim": hf["intermediate_size"], "n_kv_groups": hf.get("num_key_value_heads") or heads,
           "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
           "qk_norm": family in ("qwen3", "gemma3"), "norm_eps": hf.get("rms_norm_eps", 1e-6),
           "qkv_bias": bool(hf.get("attention_bias", False))}
    if family == "gemma3":
        if cfg["qkv_bias"]:
            raise ValueError(f"{config_path}: attention_bias=True is not supported for Gemma 3")
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                                for i in range(cfg["n_layers"])]
        cfg["rope_base"], cfg["rope_freq"] = _hf_rope(hf, "full_attention", config_path, 1_000_000.0)
        local_base, local_freq = _hf_rope(hf, "sliding_attention", config_path, 10_000.0)
        if local_freq is not None:
            raise ValueError(f"{config_path}: RoPE scaling on the sliding layers is not supported")
        cfg.update(rope_local_base=local_base, layer_types=list(layer_types), sliding_window=hf["sliding_window"],
                   query_pre_attn_scalar=hf["query_pre_attn_scalar"],
                   final_softcap=hf.get("final_logit_softcapping"))
    else:
        cfg["rope_base"], cfg["rope_freq"] = _hf_rope(hf, None, config_path, 10_000.0)
    try:
        return check_config(cfg, family), hf
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error


def _hf_key(key: str) -> str:
    """Our state_dict key -> transformers' (model.layers.N.self_attn.q_proj.weight, ...)."""
    module, _, param = key.rpartition(".")
    if module.startswith("trf_blocks."):
        _, index, inner = module.split(".", 2)
        inner = _HF_BLOCK_NAMES.get(inner, _HF_NORM_NAMES.get(inner, inner))
        return f"model.layers.{index}.{inner}.{param}"
    return f"{_HF_TOP_NAMES[module]}.{param}"


def _convert_hf_rope_model(model: RoPEModel, hf_tensors: dict[str, torch.Tensor], tied: bool, source: str) -> dict:
    """transformers' names -> ours; every tensor checked (missing, unexpected, shape) in HF's names."""
    name = _FAMILY_NAMES[model.family]
    hf = {key: t for key, t in hf_tensors.items() if not key.endswith(_HF_IGNORED_ROPE_SUFFIX)}
    if not any(key.startswith("model.") for key in hf):  # a bare LlamaModel / Qwen3Model save
        hf = {(key if key == "lm_head.weight" else "model." + key): t for key, t in hf.items()}
    if tied:
        hf.pop("lm_head.weight", None)  # tied: the embedding is the head
    ours = {}
    for key, want in model.state_dict().items():
        if key == "out_head.weight" and tied:
            continue
        hf_key = _hf_key(key)
        if hf_key not in hf:
            why = " (config.json says tie_word_embeddings=false)" if hf_key == "lm_head.weight" else ""
            raise KeyError(f"{source}: missing key {hf_key!r}{why}")
        t = hf.pop(hf_key)
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{source}: shape mismatch for {hf_key!r}: expected {_shape(want.shape)}, "
                             f"got {_shape(t.shape)}")
        ours[key] = t
    if hf:
        raise KeyError(f"{source}: unexpected key {next(iter(hf))!r}; not part of {name} with this config.json")
    if tied:
        ours["out_head.weight"] = ours["tok_emb.weight"]
    return ours


def _load_rope_model(path: str, family: str, backend: str, dtype: torch.dtype | None):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face {_FAMILY_NAMES[family]} "
                                f"directory (config.json + model.safetensors or its shards)")
    cfg, hf_config = _rope_model_config(path, family)
    tied = hf_config.get("tie_word_embeddings", family == "gemma3")
    model = _build_on_meta(cfg, backend, family)
    state_dict = _convert_hf_rope_model(model, _read_hf_tensors(path), tied, source=path)
    return _assign(model, state_dict, path, tied, torch.float32 if dtype is None else dtype)


def load_llama3(path: str, backend: str = "auto", dtype: torch.dtype | None = None) -> Llama3Model:
    """A Llama3Model with the weights of the Hugging Face LlamaForCausalLM directory `path`
    (config.json + model.safetensors, or shards listed by model.safetensors.index.json, or .bin).
    RoPE theta and "llama3" scaling from config.json; the head tied when tie_word_embeddings.
    dtype: the parameters' dtype (default float32). Returned on the CPU, in eval mode."""
    return _load_rope_model(path, "llama3", backend, dtype)


def load_qwen3(path: str, backend: str = "auto", dtype: torch.dtype | None = None) -> Qwen3Model:
    """A Qwen3Model with the weights of the Hugging Face Qwen3ForCausalLM directory `path` (as load_llama3)."""
    return _load_rope_model(path, "qwen3", backend, dtype)


def load_gemma3(path: str, backend: str = "auto", dtype: torch.dtype | None = None) -> Gemma3Model:
    """A Gemma3Model with the weights of the Hugging Face Gemma3ForCausalLM directory `path`
    (model_type gemma3_text; as load_llama3). layer_types, sliding_window, the two RoPE thetas
    and query_pre_attn_scalar from config.json; the head tied unless tie_word_embeddings=false."""
    return _load_rope_model(path, "gemma3", backend, dtype)


def load_pretrained(path: str, backend: str = "auto", dtype: torch.dtype | None = None):
    """The model of the Hugging Face checkpoint directory `path`, whichever fastgpt implements:
    GPT-2, Llama 3, Qwen 3 or Gemma 3, picked from config.json's model_type / architectures."""
    family = architecture_of(path)
    loader = {"gpt2": load_gpt2, "llama3": load_llama3, "qwen3": load_qwen3, "gemma3": load_gemma3}[family]
    return loader(path, backend=backend, dtype=dtype)


# ---- the book's state_dict and fastgpt checkpoints ---------------------------------------

def load_book_state_dict(model, state_dict: dict[str, torch.Tensor]):
    """Copies a state_dict of the book's model into `model` (a GPTModel, Llama3Model,
    Qwen3Model or Gemma3Model of the same config). The book's names: GPT-2's layer norm
    scale/shift (which land in weight/bias) and its (T, T) `mask` buffers (ignored); the
    Qwen 3 / Gemma 3 RMSNorm's `scale`; Gemma 3's `blocks`. fastgpt.nn.to_book_state_dict
    goes the other way for GPT-2."""
    weights = {key: t for key, t in state_dict.items() if not key.endswith(".att.mask")}
    _check_state_dict(model, weights, "book state_dict")
    model.load_state_dict(weights)
    return model


def save_checkpoint(model, path: str) -> None:
    """Writes the model's family, config and state_dict to one file (torch.save)."""
    torch.save({"config": dict(model.cfg), "family": model.family, "state_dict": model.state_dict(),
                "tied": model.out_head.weight is model.tok_emb.weight}, path)


def load_checkpoint(path: str, backend: str = "auto", dtype: torch.dtype | None = None):
    """The model saved by save_checkpoint(model, path), on the CPU, in eval mode;
    dtype: convert the parameters (default: keep the saved dtype)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a file written by fastgpt.save_checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not a fastgpt checkpoint (a dict with 'config' and 'state_dict')")
    family = checkpoint.get("family", "gpt2")
    if family not in MODEL_CLASSES:
        raise ValueError(f"{path}: unknown model family {family!r}; expected one of {', '.join(MODEL_CLASSES)}")
    model = _build_on_meta(checkpoint["config"], backend, family)
    return _assign(model, checkpoint["state_dict"], path, checkpoint.get("tied", False), dtype)
