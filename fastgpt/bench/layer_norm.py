"""Layer norm bandwidth: GB/s of every backend against F.layer_norm, with the device's copy
bandwidth for the same shape, measured in the same run, as the ceiling; in two scenarios.

    fastgpt bench layernorm [--scenario bandwidth|fwdbwd] [--device cpu|cuda] [--channels 768,4096]
                            [--rows 4096,16384] [--dtype float32] ...
    python benchmarks/layer_norm.py ...                 (the same program)

Scenarios (--scenario):
- bandwidth (default): the forward and the backward pass timed apart, rows 4096 on the CPU
  (4096, 8192, 16384 on a GPU), C 768 ... 8192, in --dtype;
- fwdbwd: training's use, forward and backward through autograd timed together, for both kinds
  of upstream gradient: y.sum() (autograd hands the backward an expanded, stride-0 scalar) and a
  dense dy; rows 8192, C 768 and 4096, float32 and bfloat16 (or --dtype alone).

Layer norm is memory bound, so GB/s against the copy bandwidth says how close a kernel
is to the hardware limit. Bytes counted (x, y, dy, dx: rows·C elements; weight, bias,
dweight, dbias: C elements each; mean and rstd: float32 per row):
- fwd:      read x, weight, bias; write y;
- bwd:      read x, dy, weight, mean, rstd; write dx, dweight, dbias
            (timed alone: the forward pass runs once, then the backward is repeated);
- fwd_bwd_sum:   the forward, y.sum() reading y, and a backward that reads no dy;
  fwd_bwd_dense: the forward and the backward with dy; both (5·rows·C + 5·C) elements
            + mean and rstd written and read (torch.autograd.grad of y.sum(), or of y with dy);
- copy:     dst.copy_(x): read rows·C + write rows·C elements.
Writes <out-dir>/<stem>_layer_norm[_fwdbwd].json and .md (stem: the device kind, e.g. cpu, h100;
the bandwidth scenario has no suffix).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.bench import common

PASSES = {"fwd": "forward", "bwd": "backward", "fwd_bwd_sum": "forward + backward of y.sum()",
          "fwd_bwd_dense": "forward + backward of y with a dense dy"}
BASELINE = "torch"  # F.layer_norm


@dataclass(frozen=True)
class Scenario:
    """The defaults of one kind of sweep (see the module docstring)."""
    passes: tuple[str, ...]
    rows: dict[str, tuple[int, ...]]  # device type -> row counts
    channels: tuple[int, ...]
    dtypes: tuple[str | None, ...]  # None: bfloat16 on a GPU / float32 on the CPU


SCENARIOS = {
    "bandwidth": Scenario(("fwd", "bwd"), {"cpu": (4096,), "cuda": (4096, 8192, 16384)},
                          (768, 1024, 1600, 4096, 8192), (None,)),
    "fwdbwd": Scenario(("fwd_bwd_sum", "fwd_bwd_dense"), {"cpu": (8192,), "cuda": (8192,)}, (768, 4096),
                       ("float32", "bfloat16")),
}
# The sdpa backend's layer norm is F.layer_norm itself: the baseline covers it.
DEFAULT_BACKENDS = ("naive", "cpu", "cuda", "triton")

LayerNormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layer_norm_bytes(rows: int, C: int, dtype: torch.dtype, pass_: str) -> int:
    """Bytes a layer norm pass must move at least (see the module docstring)."""
    element = torch.finfo(dtype).bits // 8
    if pass_ == "fwd":
        return (2 * rows * C + 2 * C) * element
    if pass_ == "bwd":
        return (3 * rows * C + 3 * C) * element + 2 * rows * 4
    return (5 * rows * C + 5 * C) * element + 4 * rows * 4


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
    if pass_ == "fwd_bwd_sum":
        return lambda: torch.autograd.grad(impl(*leaves).sum(), leaves)
    if pass_ == "fwd_bwd_dense":
        return lambda: torch.autograd.grad(impl(*leaves), leaves, grad_y)
    y = impl(*leaves)
    return lambda: torch.autograd.grad(y, leaves, grad_y, retain_graph=True)


def measure_shape(impls: dict[str, LayerNormFn], passes: Sequence[str], rows: int, C: int, dtype: torch.dtype,
                  device: torch.device, repeats: int | None, target_s: float) -> tuple[dict, list[dict]]:
    """(copy row, one row per (pass, impl)) for x (rows, C)."""
    gen = torch.Generator(device).manual_seed(rows * 100003 + C)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    x = randn(rows, C)  # (rows, C)
    weight, bias = 1 + 0.1 * randn(C), 0.1 * randn(C)  # (C,)
    grad_y = randn(rows, C)  # (rows, C)
    dtype_name = common.dtype_name(dtype)
    copy = {"dtype": dtype_name, "rows": rows, "C": C, **common.copy_bandwidth(x, device, repeats, target_s)}
    results = [common.measure_bandwidth({"dtype": dtype_name, "rows": rows, "C": C, "pass": pass_, "impl": name},
                                        lambda: _pass_call(impl, x, weight, bias, grad_y, pass_),
                                        layer_norm_bytes(rows, C, dtype, pass_), device, repeats, target_s,
                                        copy["gb_per_s"])
               for pass_ in passes for name, impl in impls.items()]
    common.add_speedups(results, BASELINE, ("dtype", "rows", "C", "pass"))
    return copy, results


def tables(copies: list[dict], results: list[dict], impl_names: list[str], passes: Sequence[str]) -> str:
    """One table per pass: a row per (dtype, shape), GB/s (% of copy) per implementation, speedups."""
    others = [n for n in impl_names if n != BASELINE]
    parts = []
    for pass_ in passes:
        body = []
        for copy in copies:
            shape = (copy["dtype"], copy["rows"], copy["C"])
            cells = {r["impl"]: r for r in results if r["pass"] == pass_ and (r["dtype"], r["rows"], r["C"]) == shape}
            line = [*shape, common.fmt(copy["gb_per_s"])]
            line += [common.bandwidth_cell(cells[name]) for name in impl_names]
            line += [common.speedup_cell(cells[name]) for name in others]
            body.append(line)
        headers = (["dtype", "rows", "C", "copy GB/s"] + [f"{n} GB/s (% of copy)" for n in impl_names]
                   + [f"{n} vs torch" for n in others])
        parts.append(f"### {PASSES[pass_]} ({pass_})\n\n" + common.markdown_table(headers, body))
    failures = common.failure_lines(
        results, lambda r: f"{r['impl']} {r['pass']} {r['dtype']} rows={r['rows']} C={r['C']}")
    return "\n\n".join(parts + ([failures] if failures else []))


def markdown(data: dict, impl_names: list[str]) -> str:
    env, settings = data["environment"], data["settings"]
    lines = [f"# Layer norm bandwidth: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- scenario {settings['scenario']}; x (rows, C) in {', '.join(settings['dtypes'])}; "
             "torch = F.layer_norm, the baseline",
             f"- time: {settings['timer']}",
             f"- bytes: {settings['bytes']}",
             "- GB/s = bytes / median time; % of copy = GB/s / the copy bandwidth of the same shape, this run; "
             "vs torch = F.layer_norm time / backend time", ""]
    lines += common.not_measured_lines(data["unavailable"])
    lines.append(tables(data["copy"], data["results"], impl_names, settings["passes"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench layernorm", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--scenario", default="bandwidth", choices=list(SCENARIOS),
                        help="bandwidth: fwd and bwd timed apart; fwdbwd: both through autograd, y.sum() and "
                             "dense dy (default: %(default)s)")
    parser.add_argument("--channels", default=None,
                        help="comma-separated C values (default: the scenario's, 768,1024,1600,4096,8192 or 768,4096)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row counts (default: the scenario's; bandwidth: 4096 on the CPU, "
                             "4096,8192,16384 on a GPU; fwdbwd: 8192)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.2 CPU, 0.05 GPU)")
    args = parser.parse_args(argv)
    try:
        args.channels = (list(SCENARIOS[args.scenario].channels) if args.channels is None
                         else [int(c) for c in args.channels.split(",") if c.strip()])
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
    scenario = SCENARIOS[args.scenario]
    dtypes = [common.resolve_dtype(name, device) for name in ([args.dtype] if args.dtype else scenario.dtypes)]
    unavailable: dict[str, str] = {}
    if impls is None:
        names, unavailable = common.usable_backends(args.backends, device, DEFAULT_BACKENDS)
        impls = {name: fastgpt_layer_norm(name) for name in names}
    impls = {BASELINE: torch_layer_norm, **impls}
    rows_list = args.rows or list(scenario.rows[device.type])
    target_s = args.target_s if args.target_s is not None else (0.05 if device.type == "cuda" else 0.2)
    env = common.environment(device, argv, "fastgpt bench layernorm")
    stem = (args.stem or env["device_kind"]) + "_layer_norm" + ("" if args.scenario == "bandwidth" else
                                                                  f"_{args.scenario}")
    copies, results = [], []
    shapes = [(dtype, rows, C) for dtype in dtypes for rows in rows_list for C in args.channels]
    bar = common.progress(len(shapes), "layer norm") if show_progress else None
    started = time.perf_counter()
    for dtype, rows, C in shapes:
        if bar is not None:
            bar.set_postfix_str(f"{common.dtype_name(dtype)} rows={rows} C={C}")
        copy, shape_results = measure_shape(impls, scenario.passes, rows, C, dtype, device, args.repeats, target_s)
        copies.append(copy)
        results.extend(shape_results)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    data = {
        "benchmark": "layer_norm",
        "environment": env,
        "settings": {"scenario": args.scenario, "passes": list(scenario.passes),
                     "dtypes": [common.dtype_name(d) for d in dtypes], "rows": rows_list, "channels": args.channels,
                     "implementations": list(impls), "baseline": f"{BASELINE} = F.layer_norm",
                     "repeats": args.repeats or "adaptive", "target_s": target_s,
                     "timer": common.timer_description(device),
                     "bytes": ("fwd = (2·rows·C + 2·C)·element (read x, weight, bias; write y); "
                               "bwd = (3·rows·C + 3·C)·element + 2·rows·4 (read x, dy, weight, mean, rstd; "
                               "write dx, dweight, dbias); fwd_bwd_sum, fwd_bwd_dense = (5·rows·C + 5·C)·"
                               "element + 4·rows·4 (fwd, then y.sum() reading y or a dense dy read, then bwd); "
                               "copy = 2·rows·C·element"),
                     "seconds": time.perf_counter() - started},
        "unavailable": unavailable,
        "copy": copies,
        "results": results,
    }
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data, list(impls)))
    data["files"] = paths
    common.print_report(tables(copies, results, list(impls), scenario.passes), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
