"""GPT-2 end to end: training-step and generation tokens/s of every backend.

    fastgpt bench gpt [--device cpu|cuda] [--config gpt2-small|small|tiny] [--backends ...]
    python benchmarks/gpt_e2e.py ...                    (the same program)

Every backend gets the same model (one state_dict, copied) and the same inputs:
- loss: the mean next-token cross entropy of one batch with the initial weights, in
  eval mode (no dropout), and its difference from the naive backend's (a sanity check:
  the kernels compute the same function);
- training: tokens/s of a full step (forward, backward, AdamW) in training mode, with
  bfloat16 autocast on a GPU (float32 on the CPU); the median over the timed steps;
- generation: tokens/s of model.generate (greedy, KV cache) from a random prompt,
  with the initial weights, and whether its tokens equal the naive backend's.
Writes <out-dir>/<stem>_gpt.json and .md (stem: the device kind, e.g. cpu, h100).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.bench import common
from fastgpt.models import CONFIG_NAMES, model_config

DEFAULTS = {  # per device type: config, batch size, timed steps, prompt length, new tokens
    "cpu": {"config": "small", "batch_size": 4, "steps": 3, "prompt_len": 32, "new_tokens": 32},
    "cuda": {"config": "gpt2-small", "batch_size": 8, "steps": 10, "prompt_len": 128, "new_tokens": 256},
}
OK, OOM, ERROR = "ok", "OOM", "error"


def _autocast(device: torch.device):
    """bfloat16 autocast on a GPU, as GPT-2 is trained there; float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(model: fastgpt.GPTModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def measure_backend(backend: str, cfg: dict, state: dict, batch: tuple[torch.Tensor, torch.Tensor],
                    prompt: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    """One backend's loss, training tokens/s, peak training memory, generation tokens/s."""
    inputs, targets = batch  # (B, T) token ids each
    model = fastgpt.GPTModel(cfg, backend=backend).to(device)
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
    cfg = model_config(args.config, context_length=args.context_length)
    torch.manual_seed(args.seed)
    state = {k: v.clone() for k, v in fastgpt.GPTModel(cfg, backend="naive").state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed)
    T = cfg["context_length"]
    tokens = torch.randint(0, cfg["vocab_size"], (args.batch_size, T + 1), generator=gen).to(device)
    batch = (tokens[:, :-1], tokens[:, 1:])  # inputs, targets (B, T)
    prompt_len = min(args.prompt_len, T - args.new_tokens)
    if prompt_len < 1:
        raise SystemExit(f"error: --new-tokens {args.new_tokens} leaves no room for a prompt in context {T}")
    prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_len), generator=gen).to(device)  # (1, prompt_len)
    bar = common.progress(len(names), "gpt end to end") if show_progress else None
    results = []
    for name in names:
        if bar is not None:
            bar.set_postfix_str(name)
        failure = None
        try:
            results.append(measure_backend(name, cfg, state, batch, prompt, args, device))
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
    return cfg, sum(t.numel() for t in state.values()), results


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
            body.append([r["backend"]] + ["—"] * 10 + [f"{r['status']}: {r['note']}"])
            continue
        same = r.get("same_tokens_as_naive")
        body.append([r["backend"], f"{r['train_tokens_per_s']:,.0f}", common.fmt(r["train_step_ms"]),
                     ratio(r, "train_speedup_vs_naive"), ratio(r, "train_speedup_vs_sdpa"),
                     common.fmt(r["train_peak_memory_mb"]), f"{r['generate_tokens_per_s']:,.1f}",
                     ratio(r, "generate_speedup_vs_naive"), f"{r['loss']:.5f}",
                     f"{r['loss_diff_vs_naive']:.1e}" if "loss_diff_vs_naive" in r else "—",
                     "—" if same is None else ("yes" if same else "no"), "ok"])
    return common.markdown_table(
        ["backend", "train tok/s", "step ms", "train vs naive", "train vs sdpa", "train peak MB", "gen tok/s",
         "gen vs naive", "loss", "Δloss vs naive", "same tokens", "status"], body)


def markdown(data: dict) -> str:
    env, s = data["environment"], data["settings"]
    cfg = s["model_config"]
    lines = [f"# GPT-2 end to end: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- model: {s['config']} ({s['parameters'] / 1e6:.1f}M parameters: {cfg['n_layers']} layers, "
             f"{cfg['emb_dim']} dims, {cfg['n_heads']} heads, context {cfg['context_length']}, "
             f"drop_rate {cfg['drop_rate']}), the same weights for every backend",
             f"- training: batch {s['batch_size']} x {cfg['context_length']} tokens, forward + backward + AdamW, "
             f"{s['precision']}; median of {s['steps']} steps after {s['warmup_steps']} warm-up steps",
             f"- generation: greedy, KV cache, prompt of {s['prompt_len']} tokens, {s['new_tokens']} new tokens, "
             f"median of {s['gen_repeats']} runs after a warm-up run",
             "- loss: one batch, initial weights, eval mode; Δloss = |loss - loss of the naive backend| (the book's "
             "attention); same tokens: greedy generation equals naive's",
             f"- time: {s['timer']}; train peak MB: {s['memory_measure']}",
             "- ratios (vs naive / vs sdpa) are tokens/s ratios from this run", ""]
    if data["unavailable"]:
        lines += ["Not measured (unavailable on this device):", ""]
        lines += [f"- {name}: {why}" for name, why in data["unavailable"].items()]
        lines.append("")
    lines.append(table(data["results"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench gpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: every one available on the device)")
    parser.add_argument("--config", default=None, choices=CONFIG_NAMES,
                        help="model (default: gpt2-small, the 124M model, on a GPU; small on the CPU: "
                             "4 layers, 256 dims, context 256)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="sequence length of the training batch (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on a GPU, 4 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10 GPU, 3 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps first (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 128 GPU, 32 CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 256 GPU, 32 CPU")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generation runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=123, help="weights and inputs (default: %(default)s)")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("context_length", "batch_size", "steps", "prompt_len", "new_tokens", "gen_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    return args


def run(argv: Sequence[str] | None = None, show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names, unavailable = common.usable_backends(args.backends, device)
    if not names:
        raise SystemExit("error: no backend to measure: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    env = common.environment(device, argv, "fastgpt bench gpt")
    started = time.perf_counter()
    cfg, parameters, results = run_backends(names, args, device, show_progress)
    data = {
        "benchmark": "gpt_e2e",
        "environment": env,
        "settings": {"config": args.config, "model_config": cfg,
                     "parameters": parameters,
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
    stem = (args.stem or env["device_kind"]) + "_gpt"
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data))
    data["files"] = paths
    common.print_report(table(results), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
