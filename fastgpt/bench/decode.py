"""Decoding: one query against a long KV cache (fastgpt's split-KV decode kernels) against SDPA,
with the k/v read's GB/s next to the copy bandwidth; then model.generate end to end.

    fastgpt bench decode [--device cpu|cuda] [--dtype float32] [--kv-lengths 1024,8192,32768]
                         [--batches 1,8] [--scenarios mha,gqa] [--prompts 1024,4096] [--new-tokens 64] ...

Attention: q (B, Hq, 1, D) against k, v (B, Hkv, Tk, D), causal (one new token sees every cached key).
  mha  Hq = Hkv = 12, D = 64 (GPT-2 small);  gqa  Hq = 32, Hkv = 8, D = 128 (Llama 3 8B).
  Baseline: torch's F.scaled_dot_product_attention (enable_gqa for gqa), same inputs, same run.
  A decode step must read all of k and v at least once, so GB/s = (|k| + |v|) / median time, and
  % of copy compares it with dst.copy_(k) (which reads and writes |k|: 2·|k| bytes) timed in the
  same run: memory speed is the ceiling.
End to end: GPT-2 small shapes (12 layers, 12 heads, emb 768, the GPT-2 vocabulary) with a context
  long enough for the longest prompt, random initial weights, batch 1; model.generate (greedy, KV
  cache) of --new-tokens tokens after a random prompt, for the fastgpt backends and the same model
  on the sdpa backend. Reported: prefill time (the prompt's forward pass with the cache), decode
  tokens/s (the new tokens over the time after the prefill) and overall tokens/s (new tokens over
  the whole generate call), and whether the tokens equal the sdpa model's.
Writes <out-dir>/<stem>_decode.json and .md (stem: the device kind, e.g. cpu, h100).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.bench import common
from fastgpt.models import GPTModel, model_config


@dataclass(frozen=True)
class Scenario:
    q_heads: int
    kv_heads: int
    head_dim: int
    title: str


SCENARIOS = {"mha": Scenario(12, 12, 64, "Hq = Hkv = 12, D = 64 (GPT-2 small)"),
             "gqa": Scenario(32, 8, 128, "Hq = 32, Hkv = 8, D = 128 (Llama 3 8B)")}
BASELINE = "sdpa"
DEFAULT_BACKENDS = ("cpu", "cuda", "triton")
KV_LENGTHS = (1024, 8192, 32768)
BATCHES = (1, 8)
DTYPES = ("float32", "bfloat16")
PROMPTS = (1024, 4096)
NEW_TOKENS = 64


def sdpa_decode(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def fastgpt_decode(backend: str):
    return lambda q, k, v: fastgpt.attention(q, k, v, causal=True, backend=backend)


def measure_point(impls: dict, scenario: str, B: int, Tk: int, dtype: torch.dtype, device: torch.device,
                  repeats: int | None, target_s: float) -> tuple[dict, list[dict]]:
    """(copy row, one row per implementation) for one decode shape."""
    s = SCENARIOS[scenario]
    gen = torch.Generator(device).manual_seed(B * 1000003 + Tk)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    q = randn(B, s.q_heads, 1, s.head_dim)  # (B, Hq, 1, D)
    k, v = randn(B, s.kv_heads, Tk, s.head_dim), randn(B, s.kv_heads, Tk, s.head_dim)  # (B, Hkv, Tk, D)
    point = {"scenario": scenario, "dtype": common.dtype_name(dtype), "B": B, "Tk": Tk}
    copy = {**point, **common.copy_bandwidth(k, device, repeats, target_s)}
    kv_bytes = 2 * k.numel() * k.element_size()

    def call(impl):
        def decode():
            with torch.no_grad():
                return impl(q, k, v)
        return decode

    results = [common.measure_bandwidth({**point, "impl": name}, lambda impl=impl: call(impl), kv_bytes, device,
                                        repeats, target_s, copy["gb_per_s"])
               for name, impl in impls.items()]
    common.add_speedups(results, BASELINE, ("scenario", "dtype", "B", "Tk"), field="speedup_vs_sdpa")
    return copy, results


def measure_generation(backends: Sequence[str], prompts: Sequence[int], new_tokens: int, device: torch.device,
                       repeats: int | None) -> list[dict]:
    """model.generate per (prompt length, backend): prefill ms, decode and overall tokens/s."""
    cfg = model_config("gpt2-small", context_length=max(prompts) + new_tokens, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg, backend=BASELINE).to(device).eval()
    rows = []
    for prompt_len in prompts:
        prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_len),
                               generator=torch.Generator().manual_seed(prompt_len)).to(device)
        tokens = {}
        for backend in [BASELINE, *backends]:
            model.set_backend(backend)
            row = {"prompt": prompt_len, "new_tokens": new_tokens, "backend": backend}

            def generate():
                return model.generate(prompt, max_new_tokens=new_tokens)

            def prefill():
                with torch.no_grad():
                    return model(prompt, model.new_kv_cache(1, prompt_len + new_tokens))

            try:
                tokens[backend] = generate()[0, prompt_len:].tolist()  # also the warm-up
                total = common.time_call(generate, device, repeats=repeats, min_repeats=2, target_s=0.0,
                                         flush_l2=False).median_s
                prefill()
                prefill_s = common.time_call(prefill, device, repeats=repeats, min_repeats=2, target_s=0.0,
                                             flush_l2=False).median_s
            except Exception as error:  # noqa: BLE001 - a failed backend is a row; the others go on
                row.update(status=common.OOM if common.is_out_of_memory(error) else common.ERROR,
                           note=f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
                rows.append(row)
                continue
            row.update(status=common.OK, generate_s=total, prefill_s=prefill_s,
                       decode_tokens_per_s=new_tokens / max(total - prefill_s, 1e-9),
                       tokens_per_s=new_tokens / total, same_tokens_as_sdpa=tokens[backend] == tokens.get(BASELINE))
            rows.append(row)
        base = next((r for r in rows if r["prompt"] == prompt_len and r["backend"] == BASELINE
                     and r["status"] == common.OK), None)
        for r in rows:
            if r["prompt"] == prompt_len and r["status"] == common.OK and base is not None:
                r["decode_speedup_vs_sdpa"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                r["speedup_vs_sdpa"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def attention_tables(copies: list[dict], results: list[dict], impl_names: list[str]) -> str:
    others = [n for n in impl_names if n != BASELINE]
    parts = []
    for scenario in dict.fromkeys(c["scenario"] for c in copies):
        for dtype in dict.fromkeys(c["dtype"] for c in copies if c["scenario"] == scenario):
            body = []
            for copy in (c for c in copies if c["scenario"] == scenario and c["dtype"] == dtype):
                cells = {r["impl"]: r for r in results if all(r[f] == copy[f] for f in ("scenario", "dtype", "B", "Tk"))}
                body.append([copy["B"], copy["Tk"], common.fmt(copy["gb_per_s"])]
                            + [common.fmt(cells[n].get("time_us")) if cells[n]["status"] == common.OK
                               else cells[n]["status"] for n in impl_names]
                            + [common.bandwidth_cell(cells[n]) for n in impl_names]
                            + [common.speedup_cell(cells[n], "speedup_vs_sdpa") for n in others])
            headers = (["B", "Tk", "copy GB/s"] + [f"{n} µs" for n in impl_names]
                       + [f"{n} k/v GB/s (% of copy)" for n in impl_names] + [f"{n} vs sdpa" for n in others])
            parts.append(f"### {SCENARIOS[scenario].title}, {dtype}, Tq = 1\n\n" + common.markdown_table(headers, body))
    failures = common.failure_lines(results, lambda r: f"{r['impl']} {r['scenario']} {r['dtype']} B={r['B']} "
                                                       f"Tk={r['Tk']}")
    return "\n\n".join(parts + ([failures] if failures else []))


def generation_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = []
    for r in rows:
        if r["status"] != common.OK:
            body.append([r["prompt"], r["backend"], r["status"], "", "", "", "", "", r["note"]])
            continue
        body.append([r["prompt"], r["backend"], common.fmt(r["prefill_s"] * 1e3), common.fmt(r["decode_tokens_per_s"]),
                     common.speedup_cell(r, "decode_speedup_vs_sdpa"), common.fmt(r["tokens_per_s"]),
                     common.speedup_cell(r, "speedup_vs_sdpa"), "yes" if r["same_tokens_as_sdpa"] else "NO", ""])
    return ("### model.generate end to end (GPT-2 small shapes, batch 1)\n\n"
            + common.markdown_table(["prompt", "backend", "prefill ms", "decode tok/s", "decode vs sdpa",
                                     "overall tok/s", "overall vs sdpa", "same tokens as sdpa", "note"], body))


def markdown(data: dict, impl_names: list[str]) -> str:
    env, settings = data["environment"], data["settings"]
    lines = [f"# Decoding: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- attention: q (B, Hq, 1, D) against k, v (B, Hkv, Tk, D); sdpa = F.scaled_dot_product_attention, "
             "the baseline",
             f"- time: {settings['timer']}",
             "- k/v GB/s = (|k| + |v|) / median time (the least a decode step reads); % of copy = that / the "
             "bandwidth of dst.copy_(k) (2·|k| bytes) measured for the same shape in this run; vs sdpa = sdpa "
             "time / backend time",
             f"- end to end: {settings['generation']}", ""]
    lines += common.not_measured_lines(data["unavailable"])
    lines.append(attention_tables(data["copy"], data["results"], impl_names))
    if data["generation"]:
        lines += ["", generation_table(data["generation"])]
    return "\n".join(lines)


def _int_list(parser, text: str, name: str, allow_empty: bool = False) -> list[int]:
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--{name} takes comma-separated positive integers, got {text!r}")
    if (not values and not allow_empty) or any(n < 1 for n in values):
        parser.error(f"--{name} takes comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench decode", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--kv-lengths", default=",".join(map(str, KV_LENGTHS)), help="cache lengths Tk (default: %(default)s)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"some of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--prompts", default=",".join(map(str, PROMPTS)),
                        help="end-to-end prompt lengths; empty ('') skips the generate benchmark (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated end to end (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.3 CPU, 0.05 GPU)")
    args = parser.parse_args(argv)
    args.kv_lengths = _int_list(parser, args.kv_lengths, "kv-lengths")
    args.batches = _int_list(parser, args.batches, "batches")
    args.prompts = _int_list(parser, args.prompts, "prompts", allow_empty=True)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or any(s not in SCENARIOS for s in args.scenarios):
        parser.error(f"--scenarios takes some of {', '.join(SCENARIOS)}, got {','.join(args.scenarios)!r}")
    if args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def run(argv: Sequence[str] | None = None, show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtypes = [common.resolve_dtype(name, device) for name in ([args.dtype] if args.dtype else DTYPES)]
    names, unavailable = common.usable_backends(args.backends, device, DEFAULT_BACKENDS, op="attention")
    impls = {BASELINE: sdpa_decode, **{name: fastgpt_decode(name) for name in names if name != BASELINE}}
    target_s = args.target_s if args.target_s is not None else (0.05 if device.type == "cuda" else 0.3)
    env = common.environment(device, argv, "fastgpt bench decode")
    stem = (args.stem or env["device_kind"]) + "_decode"
    points = [(scenario, dtype, B, Tk) for scenario in args.scenarios for dtype in dtypes
              for B in args.batches for Tk in args.kv_lengths]
    bar = common.progress(len(points), "decode") if show_progress else None
    started = time.perf_counter()
    copies, results = [], []
    for scenario, dtype, B, Tk in points:
        if bar is not None:
            bar.set_postfix_str(f"{scenario} {common.dtype_name(dtype)} B={B} Tk={Tk}")
        copy, point_results = measure_point(impls, scenario, B, Tk, dtype, device, args.repeats, target_s)
        copies.append(copy)
        results.extend(point_results)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    generation = measure_generation([n for n in impls if n != BASELINE], args.prompts, args.new_tokens, device,
                                    args.repeats) if args.prompts else []
    data = {
        "benchmark": "decode",
        "environment": env,
        "settings": {"dtypes": [common.dtype_name(d) for d in dtypes], "scenarios": {
                         name: vars(SCENARIOS[name]) for name in args.scenarios},
                     "kv_lengths": args.kv_lengths, "batches": args.batches, "implementations": list(impls),
                     "baseline": "sdpa = F.scaled_dot_product_attention (enable_gqa for gqa)",
                     "repeats": args.repeats or "adaptive", "target_s": target_s,
                     "timer": common.timer_description(device),
                     "generation": (f"GPT-2 small shapes, context {max(args.prompts) + args.new_tokens}, float32, "
                                    f"batch 1, prompts {args.prompts}, {args.new_tokens} new tokens, greedy"
                                    if args.prompts else "not run"),
                     "seconds": time.perf_counter() - started},
        "unavailable": unavailable,
        "copy": copies,
        "results": results,
        "generation": generation,
    }
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data, list(impls)))
    data["files"] = paths
    common.print_report(attention_tables(copies, results, list(impls)) + "\n\n" + generation_table(generation),
                        unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
