"""RMSNorm bandwidth: forward and forward+backward GB/s of every backend's rms_norm against
F.rms_norm, and of its fused add_rms_norm against `h = x + residual; F.rms_norm(h)`, with the
device's copy bandwidth for the same shape, all measured in the same run.

    fastgpt bench rmsnorm [--device cpu|cuda] [--shapes 8192x768,8192x4096] [--dtype float32] ...

RMSNorm is memory bound, so GB/s against the copy bandwidth says how close a kernel is to the
hardware limit. Bytes counted, the least each pass must move (x, residual, y, sum, dy, dsum, dx:
rows·C elements; weight, dweight: C elements; rstd: float32 per row, written by a forward that
will be differentiated and read by the backward):
- rms_norm      fwd      read x, weight; write y                          (2·rows·C + C)·element
                fwd+bwd  + rstd; read x, dy, weight, rstd; write dx, dweight
                                                                  (5·rows·C + 3·C)·element + 2·rows·4
- add_rms_norm  fwd      read x, residual, weight; write y, sum           (4·rows·C + C)·element
                fwd+bwd  + rstd; read sum, dy, dsum, weight, rstd; write dx (= dresidual), dweight
                                                                  (8·rows·C + 3·C)·element + 2·rows·4
- copy          dst.copy_(x): 2·rows·C elements.
fwd runs under torch.no_grad(); fwd+bwd times the forward and torch.autograd.grad together.
Writes <out-dir>/<stem>_rms_norm.json and .md (stem: the device kind, e.g. cpu, h100).
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

EPS = 1e-6
OPS = {"rms_norm": "rms_norm vs F.rms_norm", "add_rms_norm": "fused add_rms_norm vs x + residual, then F.rms_norm"}
PASSES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
BASELINE = "torch"  # F.rms_norm (after a separate add, for add_rms_norm)
SHAPES = ((8192, 768), (8192, 4096))
DTYPES = ("float32", "bfloat16")
# The sdpa backend's rms_norm is F.rms_norm itself: the baseline covers it.
DEFAULT_BACKENDS = ("naive", "cpu", "cuda", "triton")


def rms_norm_bytes(op: str, rows: int, C: int, dtype: torch.dtype, pass_: str) -> int:
    """Bytes a pass must move at least (see the module docstring)."""
    element = torch.finfo(dtype).bits // 8
    big = {("rms_norm", "fwd"): 2, ("rms_norm", "fwd_bwd"): 5,
           ("add_rms_norm", "fwd"): 4, ("add_rms_norm", "fwd_bwd"): 8}[(op, pass_)]
    small = 1 if pass_ == "fwd" else 3
    return (big * rows * C + small * C) * element + (2 * rows * 4 if pass_ == "fwd_bwd" else 0)


def _torch_add_rms_norm(x, residual, weight):
    total = x + residual
    return F.rms_norm(total, x.shape[-1:], weight, EPS), total


def torch_impls() -> dict[str, Callable]:
    """op -> the baseline: (x, residual, weight) -> tuple of outputs."""
    return {"rms_norm": lambda x, residual, weight: (F.rms_norm(x, x.shape[-1:], weight, EPS),),
            "add_rms_norm": _torch_add_rms_norm}


def fastgpt_impls(backend: str) -> dict[str, Callable]:
    return {"rms_norm": lambda x, residual, weight: (fastgpt.rms_norm(x, weight, EPS, backend=backend),),
            "add_rms_norm": lambda x, residual, weight: fastgpt.add_rms_norm(x, residual, weight, EPS,
                                                                             backend=backend)}


def _pass_call(impl: Callable, op: str, x, residual, weight, grads, pass_: str) -> Callable[[], object]:
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return impl(x, residual, weight)
        return forward
    leaves = [t.detach().requires_grad_() for t in ((x, weight) if op == "rms_norm" else (x, residual, weight))]
    inputs = (leaves[0], residual, leaves[1]) if op == "rms_norm" else leaves

    def forward_backward():
        outputs = impl(*inputs)
        return torch.autograd.grad(outputs, leaves, grads[:len(outputs)])
    return forward_backward


def measure_shape(impls: dict[str, dict[str, Callable]], rows: int, C: int, dtype: torch.dtype,
                  device: torch.device, repeats: int | None, target_s: float) -> tuple[dict, list[dict]]:
    """(copy row, one row per (op, pass, impl)) for x (rows, C)."""
    gen = torch.Generator(device).manual_seed(rows * 100003 + C)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    x, residual = randn(rows, C), randn(rows, C)  # (rows, C) each
    weight = 1 + 0.1 * randn(C)  # (C,)
    grads = (randn(rows, C), randn(rows, C))  # of y and of sum, (rows, C) each
    dtype_name = common.dtype_name(dtype)
    copy = {"dtype": dtype_name, "rows": rows, "C": C, **common.copy_bandwidth(x, device, repeats, target_s)}
    results = [common.measure_bandwidth({"dtype": dtype_name, "rows": rows, "C": C, "op": op, "pass": pass_,
                                         "impl": name},
                                        lambda: _pass_call(per_op[op], op, x, residual, weight, grads, pass_),
                                        rms_norm_bytes(op, rows, C, dtype, pass_), device, repeats, target_s,
                                        copy["gb_per_s"])
               for op in OPS for pass_ in PASSES for name, per_op in impls.items()]
    common.add_speedups(results, BASELINE, ("dtype", "rows", "C", "op", "pass"))
    return copy, results


def tables(copies: list[dict], results: list[dict], impl_names: list[str]) -> str:
    """One table per (op, pass): a row per (dtype, shape), GB/s (% of copy) per implementation, speedups."""
    others = [n for n in impl_names if n != BASELINE]
    parts = []
    for op, op_title in OPS.items():
        for pass_, title in PASSES.items():
            body = []
            for copy in copies:
                shape = (copy["dtype"], copy["rows"], copy["C"])
                cells = {r["impl"]: r for r in results
                         if r["op"] == op and r["pass"] == pass_ and (r["dtype"], r["rows"], r["C"]) == shape}
                body.append([*shape, common.fmt(copy["gb_per_s"])]
                            + [common.bandwidth_cell(cells[name]) for name in impl_names]
                            + [common.speedup_cell(cells[name]) for name in others])
            headers = (["dtype", "rows", "C", "copy GB/s"] + [f"{n} GB/s (% of copy)" for n in impl_names]
                       + [f"{n} vs torch" for n in others])
            parts.append(f"### {op_title}, {title} ({pass_})\n\n" + common.markdown_table(headers, body))
    failures = common.failure_lines(
        results, lambda r: f"{r['impl']} {r['op']} {r['pass']} {r['dtype']} rows={r['rows']} C={r['C']}")
    return "\n\n".join(parts + ([failures] if failures else []))


def markdown(data: dict, impl_names: list[str]) -> str:
    env, settings = data["environment"], data["settings"]
    lines = [f"# RMSNorm bandwidth: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- x, residual (rows, C) in {', '.join(settings['dtypes'])}; torch = F.rms_norm (after x + residual "
             "for add_rms_norm), the baseline",
             f"- time: {settings['timer']}",
             f"- bytes: {settings['bytes']}",
             "- GB/s = bytes / median time; % of copy = GB/s / the copy bandwidth of the same shape, this run; "
             "vs torch = torch time / backend time", ""]
    lines += common.not_measured_lines(data["unavailable"])
    lines.append(tables(data["copy"], data["results"], impl_names))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench rmsnorm", description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                        help="comma-separated ROWSxC shapes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.2 CPU, 0.05 GPU)")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",") if shape.strip()]
    except ValueError:
        parser.error("--shapes takes comma-separated ROWSxC pairs, e.g. 8192x768")
    if not args.shapes or any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        parser.error("--shapes takes comma-separated ROWSxC pairs of positive integers")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def run(argv: Sequence[str] | None = None, impls: dict[str, dict[str, Callable]] | None = None,
        show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files").
    impls: name -> {op: (x, residual, weight) -> outputs} besides torch's (default: fastgpt per backend)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtypes = [common.resolve_dtype(name, device) for name in ([args.dtype] if args.dtype else DTYPES)]
    unavailable: dict[str, str] = {}
    if impls is None:
        names, unavailable = common.usable_backends(args.backends, device, DEFAULT_BACKENDS, op="rms_norm")
        impls = {name: fastgpt_impls(name) for name in names}
    impls = {BASELINE: torch_impls(), **impls}
    target_s = args.target_s if args.target_s is not None else (0.05 if device.type == "cuda" else 0.2)
    env = common.environment(device, argv, "fastgpt bench rmsnorm")
    stem = (args.stem or env["device_kind"]) + "_rms_norm"
    copies, results = [], []
    points = [(dtype, rows, C) for dtype in dtypes for rows, C in args.shapes]
    bar = common.progress(len(points), "rms norm") if show_progress else None
    started = time.perf_counter()
    for dtype, rows, C in points:
        if bar is not None:
            bar.set_postfix_str(f"{common.dtype_name(dtype)} rows={rows} C={C}")
        copy, point_results = measure_shape(impls, rows, C, dtype, device, args.repeats, target_s)
        copies.append(copy)
        results.extend(point_results)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    data = {
        "benchmark": "rms_norm",
        "environment": env,
        "settings": {"dtypes": [common.dtype_name(d) for d in dtypes], "shapes": [list(s) for s in args.shapes],
                     "eps": EPS, "implementations": list(impls),
                     "baseline": f"{BASELINE} = F.rms_norm (x + residual first, for add_rms_norm)",
                     "repeats": args.repeats or "adaptive", "target_s": target_s,
                     "timer": common.timer_description(device),
                     "bytes": ("rms_norm fwd = (2·rows·C + C)·element, fwd_bwd = (5·rows·C + 3·C)·element + "
                               "2·rows·4; add_rms_norm fwd = (4·rows·C + C)·element, fwd_bwd = (8·rows·C + 3·C)·"
                               "element + 2·rows·4; copy = 2·rows·C·element (see fastgpt/bench/rms_norm.py)"),
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
