"""A model end to end: training-step and generation tokens/s of every backend.

    fastgpt bench model [--arch gpt2|llama3|qwen3|gemma3] [--device cpu|cuda] [--config NAME] [--backends ...]
    fastgpt bench gpt ...                    (an alias: --arch defaults to gpt2)
    python benchmarks/model.py ...           (the same program)

--arch picks the model family of fastgpt.models (GPTModel, Llama3Model, Qwen3Model,
Gemma3Model) and its default config (on the CPU the laptop-sized `small`, `llama3-small`,
`qwen3-small`, `gemma3-small`: 4 layers, 256 dims, context 256; on a GPU gpt2-small,
llama3.2-1b, qwen3-0.6b, gemma3-270m at context 1024). Every backend gets the same model
(one state_dict, copied) and the same inputs; `naive` is the book's matmul attention and
the reference norms, `sdpa` torch's scaled_dot_product_attention:
- loss: the mean next-token cross entropy of one batch with the initial weights, in
  eval mode (no dropout), and its difference from the naive backend's (a sanity check:
  the kernels compute the same function);
- training: tokens/s of a full step (forward, backward, AdamW) in training mode, with
  bfloat16 autocast on a GPU (float32 on the CPU); the median over the timed steps;
- generation: tokens/s of model.generate (greedy, KV cache) from a random prompt,
  with the initial weights, and whether its tokens equal the naive backend's.
Writes <out-dir>/<stem>_model_<arch>.json and .md (stem: the device kind, e.g. cpu, h100).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from fastgpt.bench import common
from fastgpt.models import ALL_CONFIG_NAMES, FAMILIES, MODEL_CLASSES, family_of, model_config

ARCHS = tuple(FAMILIES)  # gpt2, llama3, qwen3, gemma3
DEFAULTS = {  # per device type: batch size, timed steps, prompt length, new tokens
    "cpu": {"batch_size": 4, "steps": 3, "prompt_len": 32, "new_tokens": 32},
    "cuda": {"batch_size": 8, "steps": 10, "prompt_len": 128, "new_tokens": 256},
}
# per device type and family: the config name, and the training context length (None: the config's)
DEFAULT_CONFIGS = {
    "cpu": {"gpt2": ("small", None), "llama3": ("llama3-small", None), "qwen3": ("qwen3-small", None),
            "gemma3": ("gemma3-small", None)},
    "cuda": {"gpt2": ("gpt2-small", None), "llama3": ("llama3.2-1b", 1024), "qwen3": ("qwen3-0.6b", 1024),
             "gemma3": ("gemma3-270m", 1024)},
}
OK, OOM, ERROR = "ok", "OOM", "error"


def _autocast(device: torch.device):
    """bfloat16 autocast on a GPU, as GPT-2 is trained there; float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def measure_backend(backend: str, arch: str, cfg: dict, state: dict, batch: tuple[torch.Tensor, torch.Tensor],
                    prompt: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """One backend's loss, training tokens/s, peak training memory, generation tokens/s."""
    inputs, targets = batch  # (B, T) token ids each
    model = MODEL_CLASSES[arch](cfg, backend=backend).to(device)
    model.load_state_dict(state)
    result: dict = {"backend": backend}
    model.eval()
    with torch.no_grad(), _autocast(device):
        result["loss"] = _loss(model, inputs, targets).item()

    def generate():
        with _autocast(device):
            return model.generate(prompt, max_new_tokens=args.new_tokens, temperature=0.0)

    result["generated"] = generate()[0, prompt.shape[1]:].tolist()  # also the warm-up
    timing = common.time_call(generate, device, repeats=args.gen_repeats, flush_l2=False)
    result["generate_tokens_per_s"] = prompt.shape[0] * args.new_tokens / timing.median_s
    result["generate_ms"] = timing.median_s * 1e3

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = _loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup_steps):
        train_step()
    result["train_peak_memory_mb"] = common.peak_memory_bytes(train_step, device) / 2**20
    timing = common.time_call(train_step, device, repeats=args.steps, flush_l2=False)
    result["train_step_ms"] = timing.median_s * 1e3
    result["train_tokens_per_s"] = inputs.numel() / timing.median_s
    result["status"] = OK
    return result


def run_backends(names: Sequence[str], args: argparse.Namespace, device: torch.device, show_progress: bool
                 ) -> tuple[dict, int, list[dict]]:
    """(the config used, its parameter count, one result per backend): the same weights and
    inputs for all."""
    cfg = model_config(args.config, context_length=args.context_length, vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    reference_model = MODEL_CLASSES[args.arch](cfg, backend="naive")
    parameters = sum(p.numel() for p in reference_model.parameters())  # a tied output head counts once
    state = {k: v.clone() for k, v in reference_model.state_dict().items()}
    del reference_model
    gen = torch.Generator().manual_seed(args.seed)
    T = cfg["context_length"]
    tokens = torch.randint(0, cfg["vocab_size"], (args.batch_size, T + 1), generator=gen).to(device)
    batch = (tokens[:, :-1], tokens[:, 1:])  # inputs, targets (B, T)
    prompt_len = min(args.prompt_len, T - args.new_tokens)
    if prompt_len < 1:
        raise SystemExit(f"error: --new-tokens {args.new_tokens} leaves no room for a prompt in context {T}")
    prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_len), generator=gen).to(device)  # (1, prompt_len)
    bar = common.progress(len(names), f"{args.arch} end to end") if show_progress else None
    results = []
    for name in names:
        if bar is not None:
            bar.set_postfix_str(name)
        failure = None
        try:
            results.append(measure_backend(name, args.arch, cfg, state, batch, prompt, args, device))
        except Exception as error:  # noqa: BLE001 - every failure becomes a row; the others still run
            message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            failure = {"backend": name, "status": OOM if common.is_out_of_memory(error) else ERROR, "note": message}
        if failure is not None:
            if failure["status"] == OOM:
                common.release_memory(device)
            results.append(failure)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    _compare(results)
    return cfg, parameters, results


def _compare(results: list[dict]) -> None:
    """Speedups against naive and sdpa, |loss - naive loss|, same greedy tokens as naive."""
    by_name = {r["backend"]: r for r in results if r["status"] == OK}
    naive = by_name.get("naive")
    for r in by_name.values():
        for baseline in ("naive", "sdpa"):
            base = by_name.get(baseline)
            if base is not None:
                r[f"train_speedup_vs_{baseline}"] = r["train_tokens_per_s"] / base["train_tokens_per_s"]
                r[f"generate_speedup_vs_{baseline}"] = r["generate_tokens_per_s"] / base["generate_tokens_per_s"]
        if naive is not None:
            r["loss_diff_vs_naive"] = abs(r["loss"] - naive["loss"])
            r["same_tokens_as_naive"] = r["generated"] == naive["generated"]


def table(results: list[dict]) -> str:
    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "—"

    body = []
    for r in results:
        if r["status"] != OK:
            body.append([r["backend"]] + ["—"] * 11 + [f"{r['status']}: {r['note']}"])
            continue
        same = r.get("same_tokens_as_naive")
        body.append([r["backend"], f"{r['train_tokens_per_s']:,.0f}", common.fmt(r["train_step_ms"]),
                     ratio(r, "train_speedup_vs_naive"), ratio(r, "train_speedup_vs_sdpa"),
                     common.fmt(r["train_peak_memory_mb"]), f"{r['generate_tokens_per_s']:,.1f}",
                     ratio(r, "generate_speedup_vs_naive"), ratio(r, "generate_speedup_vs_sdpa"), f"{r['loss']:.5f}",
                     f"{r['loss_diff_vs_naive']:.1e}" if "loss_diff_vs_naive" in r else "—",
                     "—" if same is None else ("yes" if same else "no"), "ok"])
    return common.markdown_table(
        ["backend", "train tok/s", "step ms", "train vs naive", "train vs sdpa", "train peak MB", "gen tok/s",
         "gen vs naive", "gen vs sdpa", "loss", "Δloss vs naive", "same tokens", "status"], body)


TITLES = {"gpt2": "GPT-2", "llama3": "Llama 3", "qwen3": "Qwen 3", "gemma3": "Gemma 3"}


def describe_config(arch: str, cfg: dict) -> str:
    """The sizes of a config in words: layers, dims, heads (and key/value heads, head dim,
    feed-forward width and windows for the RoPE families), context."""
    parts = [f"{cfg['n_layers']} layers", f"{cfg['emb_dim']} dims", f"{cfg['n_heads']} heads"]
    if arch == "gpt2":
        parts.append(f"drop_rate {cfg['drop_rate']}")
    else:
        parts += [f"{cfg['n_kv_groups']} key/value heads",
                  f"head_dim {cfg['head_dim'] or cfg['emb_dim'] // cfg['n_heads']}",
                  f"feed-forward {cfg['hidden_dim']}"]
        if cfg.get("qk_norm"):
            parts.append("QK-norm")
        if arch == "gemma3":
            sliding = cfg["layer_types"].count("sliding_attention")
            parts.append(f"{sliding} sliding-window layers (window {cfg['sliding_window']})")
    return ", ".join(parts + [f"context {cfg['context_length']}"])


def markdown(data: dict) -> str:
    env, s = data["environment"], data["settings"]
    cfg = s["model_config"]
    lines = [f"# {TITLES[s['arch']]} end to end: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- model: {MODEL_CLASSES[s['arch']].__name__} {s['config']} ({s['parameters'] / 1e6:.1f}M parameters: "
             f"{describe_config(s['arch'], cfg)}), the same weights for every backend",
             f"- training: batch {s['batch_size']} x {cfg['context_length']} tokens, forward + backward + AdamW, "
             f"{s['precision']}; median of {s['steps']} steps after {s['warmup_steps']} warm-up steps",
             f"- generation: greedy, KV cache, prompt of {s['prompt_len']} tokens, {s['new_tokens']} new tokens, "
             f"median of {s['gen_repeats']} runs after a warm-up run",
             "- loss: one batch, initial weights, eval mode; Δloss = |loss - loss of the naive backend| (the book's "
             "matmul attention and reference norms); same tokens: greedy generation equals naive's",
             f"- time: {s['timer']}; train peak MB: {s['memory_measure']}",
             "- ratios (vs naive / vs sdpa) are tokens/s ratios from this run", ""]
    lines += common.not_measured_lines(data["unavailable"])
    lines.append(table(data["results"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=None, choices=ARCHS,
                        help="model family (default: the --config's family, else gpt2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: every one available on the device)")
    parser.add_argument("--config", default=None, choices=ALL_CONFIG_NAMES, metavar="NAME",
                        help="a config of fastgpt.models of the --arch family (default on the CPU: small, "
                             "llama3-small, qwen3-small, gemma3-small: 4 layers, 256 dims, context 256; on a GPU: "
                             "gpt2-small, llama3.2-1b, qwen3-0.6b, gemma3-270m)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="sequence length of the training batch (default: the config's; 1024 for the "
                             "GPU defaults of llama3, qwen3, gemma3)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the config's vocabulary (default: the config's; the tests shrink it)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on a GPU, 4 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10 GPU, 3 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps first (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 128 GPU, 32 CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 256 GPU, 32 CPU")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generation runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=123, help="weights and inputs (default: %(default)s)")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("context_length", "vocab_size", "batch_size", "steps", "prompt_len", "new_tokens", "gen_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.config is not None:
        family = family_of(args.config)
        if args.arch is not None and args.arch != family:
            parser.error(f"--config {args.config} is a {family} config, not {args.arch}")
        args.arch = family
    elif args.arch is None:
        args.arch = "gpt2"
    return args


def apply_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fills what the command line left unset with the device's defaults (and --arch's config)."""
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.config is None:
        args.config, context_length = DEFAULT_CONFIGS[device.type][args.arch]
        if args.context_length is None:
            args.context_length = context_length
    return args


def run(argv: Sequence[str] | None = None, show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    apply_defaults(args, device)
    names, unavailable = common.usable_backends(args.backends, device)
    if not names:
        raise SystemExit("error: no backend to measure: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    env = common.environment(device, argv, "fastgpt bench model")
    started = time.perf_counter()
    cfg, parameters, results = run_backends(names, args, device, show_progress)
    data = {
        "benchmark": "model",
        "environment": env,
        "settings": {"arch": args.arch, "model_class": MODEL_CLASSES[args.arch].__name__, "config": args.config,
                     "model_config": cfg, "parameters": parameters,
                     "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "prompt_len": min(args.prompt_len, cfg["context_length"] - args.new_tokens),
                     "new_tokens": args.new_tokens, "gen_repeats": args.gen_repeats, "seed": args.seed,
                     "precision": "bfloat16 autocast" if device.type == "cuda" else "float32",
                     "optimizer": "AdamW(lr=4e-4, weight_decay=0.1)",
                     "timer": common.timer_description(device, flush_l2=False),
                     "memory_measure": common.MEMORY_MEASURE[device.type],
                     "seconds": time.perf_counter() - started},
        "unavailable": unavailable,
        "results": results,
    }
    stem = f"{args.stem or env['device_kind']}_model_{args.arch}"
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data))
    data["files"] = paths
    common.print_report(table(results), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
