"""Layer norm bandwidth: forward and backward GB/s of every backend against F.layer_norm,
with the device's copy bandwidth for the same bytes, measured in the same run, as the ceiling.

    fastgpt bench layernorm [--device cpu|cuda] [--channels 768,4096] [--rows 4096,16384] ...
    python benchmarks/layer_norm.py ...                 (the same program)

Layer norm is memory bound, so GB/s against the copy bandwidth says how close a kernel
is to the hardware limit. Bytes counted (x, y, dy, dx: rows·C elements; weight, bias,
dweight, dbias: C elements each; mean and rstd: float32 per row):
- forward:  read x, weight, bias; write y;
- backward: read x, dy, weight, mean, rstd; write dx, dweight, dbias
  (timed alone: the forward pass runs once, then the backward is repeated).
- copy:     dst.copy_(x): read rows·C + write rows·C elements.
Writes <out-dir>/<stem>_layer_norm.json and .md (stem: the device kind, e.g. cpu, h100).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.bench import common

PASSES = {"fwd": "forward", "bwd": "backward"}
BASELINE = "torch"  # F.layer_norm
CHANNELS = (768, 1024, 1600, 4096, 8192)
DEFAULT_ROWS = {"cpu": (4096,), "cuda": (4096, 8192, 16384)}
# The sdpa backend's layer norm is F.layer_norm itself: the baseline covers it.
DEFAULT_BACKENDS = ("naive", "cpu", "cuda", "triton")

LayerNormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layer_norm_bytes(rows: int, C: int, dtype: torch.dtype, pass_: str) -> int:
    """Bytes a layer norm pass must move at least (see the module docstring)."""
    element = torch.finfo(dtype).bits // 8
    if pass_ == "fwd":
        return (2 * rows * C + 2 * C) * element
    return (3 * rows * C + 3 * C) * element + 2 * rows * 4


def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)


def fastgpt_layer_norm(backend: str) -> LayerNormFn:
    return lambda x, weight, bias: fastgpt.layer_norm(x, weight, bias, 1e-5, backend=backend)


def _pass_call(impl: LayerNormFn, x, weight, bias, grad_y, pass_: str) -> Callable[[], object]:
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return impl(x, weight, bias)
        return forward
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = impl(*leaves)
    return lambda: torch.autograd.grad(y, leaves, grad_y, retain_graph=True)


def measure_shape(impls: dict[str, LayerNormFn], rows: int, C: int, dtype: torch.dtype, device: torch.device,
                  repeats: int | None, target_s: float) -> tuple[dict, list[dict]]:
    """(copy row, one row per (pass, impl)) for x (rows, C)."""
    gen = torch.Generator(device).manual_seed(rows * 100003 + C)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    x = randn(rows, C)  # (rows, C)
    weight, bias = 1 + 0.1 * randn(C), 0.1 * randn(C)  # (C,)
    grad_y = randn(rows, C)  # (rows, C)
    copy = {"rows": rows, "C": C, **common.copy_bandwidth(x, device, repeats, target_s)}
    results = [common.measure_bandwidth({"rows": rows, "C": C, "pass": pass_, "impl": name},
                                        lambda: _pass_call(impl, x, weight, bias, grad_y, pass_),
                                        layer_norm_bytes(rows, C, dtype, pass_), device, repeats, target_s,
                                        copy["gb_per_s"])
               for pass_ in PASSES for name, impl in impls.items()]
    common.add_speedups(results, BASELINE, ("rows", "C", "pass"))
    return copy, results


def tables(copies: list[dict], results: list[dict], impl_names: list[str]) -> str:
    """One table per pass: a row per shape, GB/s (% of copy) per implementation, speedups."""
    others = [n for n in impl_names if n != BASELINE]
    parts = []
    for pass_, title in PASSES.items():
        body = []
        for copy in copies:
            cells = {r["impl"]: r for r in results
                     if r["pass"] == pass_ and r["rows"] == copy["rows"] and r["C"] == copy["C"]}
            line = [copy["rows"], copy["C"], common.fmt(copy["gb_per_s"])]
            line += [common.bandwidth_cell(cells[name]) for name in impl_names]
            line += [common.speedup_cell(cells[name]) for name in others]
            body.append(line)
        headers = (["rows", "C", "copy GB/s"] + [f"{n} GB/s (% of copy)" for n in impl_names]
                   + [f"{n} vs torch" for n in others])
        parts.append(f"### {title} ({pass_})\n\n" + common.markdown_table(headers, body))
    failures = common.failure_lines(results, lambda r: f"{r['impl']} {r['pass']} rows={r['rows']} C={r['C']}")
    return "\n\n".join(parts + ([failures] if failures else []))


def markdown(data: dict, impl_names: list[str]) -> str:
    env, settings = data["environment"], data["settings"]
    lines = [f"# Layer norm bandwidth: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- x (rows, C) in {settings['dtype']}; torch = F.layer_norm, the baseline",
             f"- time: {settings['timer']}",
             f"- bytes: {settings['bytes']}",
             "- GB/s = bytes / median time; % of copy = GB/s / the copy bandwidth of the same shape, this run; "
             "vs torch = F.layer_norm time / backend time", ""]
    lines += common.not_measured_lines(data["unavailable"])
    lines.append(tables(data["copy"], data["results"], impl_names))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench layernorm", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--channels", default=",".join(map(str, CHANNELS)), help="comma-separated C values (default: %(default)s)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row counts (default: 4096 on the CPU; 4096,8192,16384 on a GPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.2 CPU, 0.05 GPU)")
    args = parser.parse_args(argv)
    try:
        args.channels = [int(c) for c in args.channels.split(",") if c.strip()]
        args.rows = None if args.rows is None else [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        parser.error("--channels and --rows take comma-separated integers")
    if not args.channels or min(args.channels) < 1 or (args.rows is not None and (not args.rows or min(args.rows) < 1)):
        parser.error("--channels and --rows take positive integers")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def run(argv: Sequence[str] | None = None, impls: dict[str, LayerNormFn] | None = None,
        show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files").
    impls: layer norms to measure besides F.layer_norm (default: fastgpt.layer_norm per backend)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    unavailable: dict[str, str] = {}
    if impls is None:
        names, unavailable = common.usable_backends(args.backends, device, DEFAULT_BACKENDS)
        impls = {name: fastgpt_layer_norm(name) for name in names}
    impls = {BASELINE: torch_layer_norm, **impls}
    rows_list = args.rows or list(DEFAULT_ROWS[device.type])
    target_s = args.target_s if args.target_s is not None else (0.05 if device.type == "cuda" else 0.2)
    env = common.environment(device, argv, "fastgpt bench layernorm")
    stem = (args.stem or env["device_kind"]) + "_layer_norm"
    copies, results = [], []
    shapes = [(rows, C) for rows in rows_list for C in args.channels]
    bar = common.progress(len(shapes), "layer norm") if show_progress else None
    started = time.perf_counter()
    for rows, C in shapes:
        if bar is not None:
            bar.set_postfix_str(f"rows={rows} C={C}")
        copy, shape_results = measure_shape(impls, rows, C, dtype, device, args.repeats, target_s)
        copies.append(copy)
        results.extend(shape_results)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    data = {
        "benchmark": "layer_norm",
        "environment": env,
        "settings": {"dtype": common.dtype_name(dtype), "rows": rows_list, "channels": args.channels,
                     "implementations": list(impls), "baseline": f"{BASELINE} = F.layer_norm",
                     "repeats": args.repeats or "adaptive", "target_s": target_s,
                     "timer": common.timer_description(device),
                     "bytes": ("fwd = (2·rows·C + 2·C)·element (read x, weight, bias; write y); "
                               "bwd = (3·rows·C + 3·C)·element + 2·rows·4 (read x, dy, weight, mean, rstd; "
                               "write dx, dweight, dbias); copy = 2·rows·C·element"),
                     "seconds": time.perf_counter() - started},
        "unavailable": unavailable,
        "copy": copies,
        "results": results,
    }
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data, list(impls)))
    data["files"] = paths
    common.print_report(tables(copies, results, list(impls)), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
