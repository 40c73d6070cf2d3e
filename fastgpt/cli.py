"""The `fastgpt` command: info | generate | bench attention|layernorm|rmsnorm|model|decode|context-parallel | train.

`bench` and `train` hand the rest of the command line, untouched, to the main(argv)
of the module that implements them, imported only when asked for.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys

BENCHMARKS = {"attention": "fastgpt.bench.attention", "layernorm": "fastgpt.bench.layer_norm",
              "rmsnorm": "fastgpt.bench.rms_norm", "model": "fastgpt.bench.model", "decode": "fastgpt.bench.decode",
              "context-parallel": "fastgpt.bench.context_parallel"}
# Older names: `fastgpt bench context` is the attention benchmark; `fastgpt bench gpt` the model benchmark
# (whose --arch defaults to gpt2: the GPT-2 end-to-end benchmark it was).
BENCH_ALIASES = {"context": "attention", "gpt": "model"}
RANDOM_WEIGHTS_WARNING = (
    "WARNING: no --weights given: the model has RANDOM weights and will print gibberish.\n"
    "         Pass --weights DIR (a Hugging Face directory: config.json + model.safetensors)\n"
    "         or --weights FILE (a fastgpt checkpoint) for real text.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fastgpt

    report = fastgpt.info()
    print(f"fastgpt {fastgpt.__version__}  torch {torch.__version__}  triton {_version('triton')}  "
          f"python {platform.python_version()}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}\n")
    print("backends:")
    for name, entry in report.items():
        if name == "auto":
            continue
        status = f"available on {', '.join(entry['devices'])}" if entry["available"] else "unavailable"
        print(f"  {name:<7} {status:<26} {entry['description']}")
        if entry["reason"]:
            print(f"          why not: {entry['reason']}")
    picks = ", ".join(f"{device} tensors -> {pick}" for device, pick in report["auto"]["picks"].items())
    print(f"\nauto picks: {picks}")
    return 0


def _resolve_config(spec: str) -> dict:
    """A config name of fastgpt.models (tiny, small, gpt2-small, llama3-tiny, qwen3-0.6b, ...), a
    JSON object, or the path of a JSON file; JSON overrides gpt2-small's keys."""
    from .models import ALL_CONFIG_NAMES, model_config

    if spec in ALL_CONFIG_NAMES:
        return model_config(spec)
    if os.path.isfile(spec):
        with open(spec) as f:
            text = f.read()
    elif spec.lstrip().startswith("{"):
        text = spec
    else:
        raise SystemExit(f"fastgpt generate: --config {spec!r} is neither a config name "
                         f"({', '.join(ALL_CONFIG_NAMES)}), a JSON object nor a JSON file")
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"fastgpt generate: --config is not valid JSON: {error}") from error
    if not isinstance(overrides, dict):
        raise SystemExit("fastgpt generate: --config JSON must be an object of config keys")
    try:
        return model_config("gpt2-small", **overrides)
    except ValueError as error:
        raise SystemExit(f"fastgpt generate: --config: {error}") from error


class _HFTokenizer:
    """DIR/tokenizer.json through the `tokenizers` package, with tiktoken's encode / decode."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ModuleNotFoundError as error:
            raise SystemExit(f"fastgpt generate: {path} needs the `tokenizers` package "
                             f"(pip install tokenizers; transformers installs it)") from error
        self.tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # with the special tokens the tokenizer adds (Llama's BOS)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _eos_ids(directory: str) -> list[int]:
    """The end-of-sequence ids of a HF directory: generation_config.json's, else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def _tokenizer_for(weights: str | None, family: str):
    """(tokenizer, eos ids): DIR/tokenizer.json when there is one, else GPT-2's tiktoken for GPT-2
    (and for models with random weights); a clear message for the other families."""
    from .tokenizer import get_tokenizer

    if weights is not None and os.path.isdir(weights):
        path = os.path.join(weights, "tokenizer.json")
        if os.path.isfile(path):
            return _HFTokenizer(path), _eos_ids(weights)
        if family != "gpt2":
            raise SystemExit(f"fastgpt generate: {weights} has no tokenizer.json; a {family} model needs the "
                             f"tokenizer it was trained with (download tokenizer.json with the weights)")
    tokenizer = get_tokenizer()
    return tokenizer, [tokenizer.eot_token]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .models import ALL_CONFIG_NAMES, MODEL_CLASSES, family_of
    from .weights import load_checkpoint, load_pretrained

    torch.manual_seed(args.seed)
    if args.weights is None:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        family = family_of(args.config) if args.config in ALL_CONFIG_NAMES else "gpt2"
        model = MODEL_CLASSES[family](_resolve_config(args.config), backend=args.backend)
    elif os.path.isdir(args.weights):
        try:
            model = load_pretrained(args.weights, backend=args.backend)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise SystemExit(f"fastgpt generate: --weights {args.weights}: {error}") from error
    else:
        model = load_checkpoint(args.weights, backend=args.backend)
    tokenizer, eos_ids = _tokenizer_for(args.weights, model.family)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ids = (tokenizer.encode(args.prompt) if isinstance(tokenizer, _HFTokenizer)
           else tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"}))
    if not ids:
        raise SystemExit("fastgpt generate: the prompt is empty")
    if max(ids) >= model.cfg["vocab_size"]:
        raise SystemExit(f"fastgpt generate: the prompt has token id {max(ids)}, but the model's vocab_size "
                         f"is {model.cfg['vocab_size']} (GPT-2's tokenizer needs 50257)")
    prompt = torch.tensor([ids], device=device)  # (1, T)
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, eos_id=eos_ids or None)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def _delegate(module_name: str, argv: list[str]) -> int:
    """module_name.main(argv), with a clear error when that module is not part of this install."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise  # the module exists but one of its own imports is missing: show that error
        raise SystemExit(f"fastgpt: {module_name} is not available in this install ({error})") from error
    return module.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,generate,bench,train}")

    info = commands.add_parser("info", help="which backends are compiled and usable here, and why not")
    info.set_defaults(handler=cmd_info)

    gen = commands.add_parser("generate", help="generate text with GPT-2, Llama 3, Qwen 3 or Gemma 3 (KV cache)")
    gen.add_argument("prompt")
    gen.add_argument("--weights", help="Hugging Face directory (GPT-2, Llama, Qwen3 or Gemma3ForCausalLM: config.json, "
                                       "safetensors, tokenizer.json; the architecture comes from config.json) or a "
                                       "fastgpt checkpoint file (default: random weights, with a warning)")
    gen.add_argument("--config", default="gpt2-small",
                     help="without --weights: a config name (tiny|small|gpt2-small|medium|large|xl, llama3-tiny, "
                          "qwen3-tiny, gemma3-tiny, llama3.2-1b, ...), or a JSON object "
                          "or JSON file whose keys override gpt2-small's, e.g. "
                          "'{\"emb_dim\": 64, \"n_heads\": 4, \"n_layers\": 2}' for a tiny CPU demo")
    gen.add_argument("--backend", default="auto", help="auto|naive|sdpa|cpu|cuda|triton (default auto)")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=123)
    gen.set_defaults(handler=cmd_generate)

    # Parsed by hand in main() (see there); declared here for --help.
    bench = commands.add_parser("bench", help="benchmarks: attention (alias: context) | layernorm | rmsnorm | "
                                              "model --arch gpt2|llama3|qwen3|gemma3 (alias: gpt) | decode | "
                                              "context-parallel "
                                              "[their options]; results go to benchmarks/out/")
    bench.add_argument("which", choices=sorted(BENCHMARKS) + sorted(BENCH_ALIASES))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    train = commands.add_parser("train", help="train GPT-2 on a text file [its options]; under torchrun: DDP, "
                                              "--fsdp, --context-parallel K")
    train.add_argument("args", nargs=argparse.REMAINDER, help="passed to fastgpt.train")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # bench/train own their options. argparse.REMAINDER alone cannot pass them on: it
    # rejects a leading option (`fastgpt train --epochs 3`), so these go straight through.
    if argv[:1] == ["train"]:
        return _delegate("fastgpt.train", argv[1:])
    which = BENCH_ALIASES.get(argv[1], argv[1]) if argv[:1] == ["bench"] and len(argv) > 1 else None
    if which in BENCHMARKS:
        return _delegate(BENCHMARKS[which], argv[2:])
    args = build_parser().parse_args(argv)
    return args.handler(args)
