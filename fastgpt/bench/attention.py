"""Causal attention against context length: time and peak memory of every backend.

    fastgpt bench attention [--device cpu|cuda] [--max-t T] [--backends naive,sdpa,cpu] ...
    fastgpt bench context ...                           (an alias)
    python benchmarks/attention.py ...                  (the same program)

For T = min_t, 2·min_t, ..., max_t and for the forward pass (fwd) and forward +
backward (fwdbwd) of fastgpt.attention(q, k, v, causal=True, backend=b) with
q, k, v (B, H, T, D), it records the median time, the peak extra memory, FLOP/s and
the speed ratio against naive and sdpa measured in the same run. Writes
<out-dir>/<stem>_attention.json, .md and .png (stem: the device kind, e.g. cpu, h100).

A point that cannot run is a row, never a gap:
- "OOM": the backend ran out of memory (torch.OutOfMemoryError, MemoryError, the CPU
  allocator's error), or, for naive, the pre-check found that its (T, T) score
  matrices would not fit in the memory available; larger T are not tried;
- "skipped (budget)": the time predicted from the previous T (time ∝ T²) does not fit
  in this series' share of the time budget; larger T are not tried either;
- "error": anything else, with the message.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

import fastgpt
from fastgpt.bench import common

PROG = "fastgpt bench attention"  # also `fastgpt bench context` (fastgpt.cli.BENCH_ALIASES)
MODES = {"fwd": "forward", "fwdbwd": "forward + backward"}
# FLOPs of fwd+bwd relative to fwd: backward is 2.5x forward (FlashAttention's count).
MODE_FLOP_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
# The naive backend materialises (B, H, T, T) matrices: at its peak 4 of them are alive
# (scores, scaled, masked, softmax, in fwd and fwd+bwd alike; measured with the
# profiler), plus the (T, T) bool causal mask.
NAIVE_LIVE_SCORE_MATRICES = 4
MATERIALISES_SCORES = ("naive",)
DEFAULT_MAX_T = {"cpu": 8192, "cuda": 131072}
DEFAULT_BUDGET_S = {"cpu": 150.0, "cuda": 600.0}
OK, OOM, SKIPPED, ERROR = "ok", "OOM", "skipped (budget)", "error"
COLORS = {"naive": "#d62728", "sdpa": "#444444", "cpu": "#1f77b4", "cuda": "#2ca02c", "triton": "#9467bd"}
SLOPE_POINTS = 4  # the slope is fitted over the largest T measured (the asymptotic regime)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    """4·B·H·T²·D (two matmuls of 2·T²·D each per head), halved when causal; fwd+bwd 3.5x."""
    return 4.0 * B * H * T * T * D * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


def naive_peak_bytes(B: int, H: int, T: int, dtype: torch.dtype) -> int:
    """What the naive backend needs at its peak for context T (see NAIVE_LIVE_SCORE_MATRICES)."""
    element = torch.finfo(dtype).bits // 8
    return NAIVE_LIVE_SCORE_MATRICES * B * H * T * T * element + T * T


def fastgpt_attention(backend: str) -> AttentionFn:
    return lambda q, k, v, causal: fastgpt.attention(q, k, v, causal=causal, backend=backend)


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    B: int
    H: int
    D: int
    causal: bool
    t_values: list[int]
    modes: list[str]
    repeats: int | None  # None: adaptive (min_repeats .. target_s per point)
    min_repeats: int
    target_s: float
    budget_s: float | None  # None: no budget
    memory_limit_bytes: int


@dataclass
class Series:
    """The sweep over T of one (mode, backend)."""
    mode: str
    backend: str
    last_point: tuple[int, float] | None = None  # (T, median seconds) of the last measured point
    stopped: tuple[str, str] | None = None  # (status, note) once a T failed: larger T are not run
    rows: list[dict] = field(default_factory=list)


def _inputs(settings: Settings, T: int, mode: str):
    """q, k, v (B, H, T, D) and, for fwdbwd, the output gradient (B, H, T, D)."""
    gen = torch.Generator(settings.device).manual_seed(T)
    shape = (settings.B, settings.H, T, settings.D)

    def randn():
        return torch.randn(shape, generator=gen, device=settings.device, dtype=settings.dtype)

    q, k, v = randn(), randn(), randn()
    if mode == "fwd":
        return q, k, v, None
    grad_out = randn()
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out


def _call(attn: AttentionFn, settings: Settings, T: int, mode: str) -> Callable[[], object]:
    q, k, v, grad_out = _inputs(settings, T, mode)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return attn(q, k, v, settings.causal)
        return forward
    return lambda: torch.autograd.grad(attn(q, k, v, settings.causal), (q, k, v), grad_out)


def _untimed_calls(device: torch.device) -> int:
    """Calls before the timed ones: the memory-measuring call (which warms up on the CPU),
    plus a plain warm-up on a GPU (Triton compiles and autotunes on its first call)."""
    return 2 if device.type == "cuda" else 1


def _refusal(series: Series, settings: Settings, T: int, started: float, active: int) -> tuple[str, str] | None:
    """(status, note) when the point (series, T) should not be run, else None."""
    if series.backend in MATERIALISES_SCORES:
        need = naive_peak_bytes(settings.B, settings.H, T, settings.dtype)
        if need > settings.memory_limit_bytes:
            return OOM, (f"pre-check: its (T, T) score matrices need {need / 2**30:.2f} GiB, "
                         f"{settings.memory_limit_bytes / 2**30:.2f} GiB available")
    if settings.budget_s is None or series.last_point is None:
        return None
    last_t, last_s = series.last_point
    predicted_call_s = last_s * (T / last_t) ** 2
    calls = _untimed_calls(settings.device) + (settings.repeats or settings.min_repeats)
    remaining = settings.budget_s - (time.perf_counter() - started)
    share = remaining / active  # this series' fair share of what is left
    if predicted_call_s * calls > share:
        return SKIPPED, (f"predicted {predicted_call_s * calls:.1f} s for this point, "
                         f"{max(share, 0.0):.1f} s of the budget left for it")
    return None


def _measure(series: Series, attn: AttentionFn, settings: Settings, T: int) -> dict:
    device = settings.device
    fn = failure = None
    try:
        fn = _call(attn, settings, T, series.mode)  # allocates the inputs: may run out of memory too
        if device.type == "cuda":
            fn()  # warm-up: compilation, autotuning, cuBLAS handles
        peak = common.peak_memory_bytes(fn, device)
        timing = common.time_call(fn, device, repeats=settings.repeats, target_s=settings.target_s,
                                  min_repeats=settings.min_repeats)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        failure = {"status": OOM if common.is_out_of_memory(error) else ERROR, "note": message}
    if failure is not None:
        del fn  # the inputs; the failed call's tensors went with the exception's traceback
        if failure["status"] == OOM:
            common.release_memory(device)
        return failure
    series.last_point = (T, timing.median_s)
    flops = attention_flops(settings.B, settings.H, T, settings.D, settings.causal, series.mode)
    return {"status": OK, "time_ms": timing.median_s * 1e3, "repeats": timing.repeats,
            "memory_mb": peak / 2**20, "flops": flops, "flop_per_s": flops / timing.median_s}


def run_sweep(settings: Settings, impls: dict[str, AttentionFn], show_progress: bool = True) -> list[dict]:
    """Every (mode, backend, T) point as a row; see the module docstring for the statuses."""
    series = [Series(mode, name) for mode in settings.modes for name in impls]
    started = time.perf_counter()
    bar = common.progress(len(series) * len(settings.t_values), "attention") if show_progress else None
    for T in settings.t_values:
        for one in series:
            if bar is not None:
                bar.set_postfix_str(f"{one.backend} {one.mode} T={T}")
            row = {"backend": one.backend, "mode": one.mode, "T": T}
            if one.stopped is not None:
                status, note = one.stopped
                row.update(status=status, note=note)
            else:
                active = sum(s.stopped is None for s in series)
                refusal = _refusal(one, settings, T, started, active)
                row.update({"status": refusal[0], "note": refusal[1]} if refusal
                           else _measure(one, impls[one.backend], settings, T))
                if row["status"] in (OOM, SKIPPED):
                    one.stopped = (row["status"], f"since T={T}")
            one.rows.append(row)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    rows = [row for one in series for row in one.rows]
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """speedup_vs_<baseline> = baseline time / this time, both from this run."""
    times = {(r["mode"], r["T"], r["backend"]): r["time_ms"] for r in rows if r["status"] == OK}
    for row in rows:
        for baseline in ("naive", "sdpa"):
            base = times.get((row["mode"], row["T"], baseline))
            if row["status"] == OK and base is not None:
                row[f"speedup_vs_{baseline}"] = base / row["time_ms"]


def fitted_slopes(rows: list[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{mode: {backend: {"time": slope, "memory": slope}}}: log-log slopes over the largest
    SLOPE_POINTS measured T (memory ∝ T² gives 2, ∝ T gives 1)."""
    slopes: dict = {}
    for row in rows:
        slopes.setdefault(row["mode"], {}).setdefault(row["backend"], None)
    for mode, by_backend in slopes.items():
        for backend in by_backend:
            ok = [r for r in rows if r["mode"] == mode and r["backend"] == backend and r["status"] == OK]
            tail = ok[-SLOPE_POINTS:]
            ts = [r["T"] for r in tail]
            by_backend[backend] = {"time": common.loglog_slope(ts, [r["time_ms"] for r in tail]),
                                   "memory": common.loglog_slope(ts, [r["memory_mb"] for r in tail])}
    return slopes


def first_failure(rows: list[dict], mode: str, backend: str) -> dict | None:
    """The first row of a series that did not run (OOM or skipped), if any."""
    for row in rows:
        if row["mode"] == mode and row["backend"] == backend and row["status"] in (OOM, SKIPPED):
            return row
    return None


# ---- output ----------------------------------------------------------------------------

def _flops_unit(device: torch.device) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)


def _ratio(speedup: float | None) -> str:
    return "—" if speedup is None else f"{speedup:.2f}x"


def tables(rows: list[dict], settings: Settings) -> str:
    unit, scale = _flops_unit(settings.device)
    parts = []
    for mode in settings.modes:
        body = []
        for row in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["T"]):
            ok = row["status"] == OK
            body.append([row["T"], row["backend"],
                         common.fmt(row["time_ms"]) if ok else "—",
                         common.fmt(row["memory_mb"]) if ok else "—",
                         common.fmt(row["flop_per_s"] / scale) if ok else "—",
                         _ratio(row.get("speedup_vs_naive")), _ratio(row.get("speedup_vs_sdpa")),
                         row["status"] if ok else f"{row['status']}: {row['note']}"])
        parts.append(f"### {MODES[mode]} ({mode})\n\n" + common.markdown_table(
            ["T", "backend", "time ms", "memory MB", unit, "vs naive", "vs sdpa", "status"], body))
    return "\n\n".join(parts)


def slopes_table(slopes: dict) -> str:
    body = [[MODES[mode], backend, common.fmt(s["time"], 2), common.fmt(s["memory"], 2)]
            for mode, by_backend in slopes.items() for backend, s in by_backend.items()]
    return common.markdown_table(["pass", "backend", "time slope", "memory slope"], body)


def markdown(data: dict, settings: Settings, png_name: str) -> str:
    env = data["environment"]
    shape = (f"B={settings.B}, H={settings.H}, D={settings.D}, {'causal' if settings.causal else 'non-causal'}, "
             f"{common.dtype_name(settings.dtype)}")
    lines = [f"# Causal attention vs context length: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- shape: q, k, v (B, H, T, D) with {shape}; T = {settings.t_values[0]} .. {settings.t_values[-1]}",
             f"- time: {data['settings']['timer']}",
             f"- memory: peak extra memory of one call, outputs included: {data['settings']['memory_measure']}",
             f"- FLOPs: {data['settings']['flops']}",
             "- vs naive / vs sdpa: speedup = baseline time / backend time, both measured in this run",
             f"- slopes: least-squares log-log slope over the {SLOPE_POINTS} largest T measured "
             "(2: quadratic in T, 1: linear)", ""]
    if data["unavailable"]:
        lines += ["Not measured (unavailable on this device):", ""]
        lines += [f"- {name}: {why}" for name, why in data["unavailable"].items()]
        lines.append("")
    lines += [f"![time and memory vs T]({png_name})", "", tables(data["results"], settings), "",
              "### fitted log-log slopes", "", slopes_table(data["slopes"])]
    return "\n".join(lines)


def _t_label(T: int) -> str:
    return f"{T // 1024}k" if T >= 1024 else str(T)


def plot(rows: list[dict], settings: Settings, slopes: dict, title: str, path: str) -> None:
    """2 x len(modes) panels: time (top) and memory (bottom) vs T, log-log, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = settings.modes
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9.5), squeeze=False)
    backends_seen = list(dict.fromkeys(r["backend"] for r in rows))
    metrics = (("time_ms", "time", "median time (ms)"), ("memory_mb", "memory", "peak extra memory (MB)"))
    for col, mode in enumerate(modes):
        for row_index, (key, slope_key, ylabel) in enumerate(metrics):
            ax = axes[row_index][col]
            failures = []
            for backend in backends_seen:
                ok = [r for r in rows if r["mode"] == mode and r["backend"] == backend and r["status"] == OK]
                color = COLORS.get(backend)
                slope = slopes.get(mode, {}).get(backend, {}).get(slope_key)
                label = backend + (f"  (slope {slope:.2f})" if slope is not None else "")
                if ok:
                    ax.plot([r["T"] for r in ok], [r[key] for r in ok], marker="o", markersize=4,
                            linewidth=1.8, color=color, label=label)
                failure = first_failure(rows, mode, backend)
                if failure is not None:
                    failures.append((backend, failure, color))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlim(settings.t_values[0] / 1.3, settings.t_values[-1] * 1.3)  # room for the labels
            ax.set_xticks(settings.t_values)
            ax.set_xticklabels([_t_label(t) for t in settings.t_values])
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("context length T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{MODES[mode]}: {slope_key}", fontsize=11)
            for i, (backend, failure, color) in enumerate(failures):
                # A dotted line where the series stops, labelled along it (left, then right of it).
                ax.axvline(failure["T"], color=color, linestyle=":", linewidth=1.6)
                ax.annotate(f"{backend}: {failure['status']}",
                            xy=(failure["T"], 0.03), xycoords=("data", "axes fraction"),
                            xytext=(-3 if i % 2 == 0 else 3, 0), textcoords="offset points",
                            rotation=90, ha="right" if i % 2 == 0 else "left", va="bottom",
                            fontsize=9, color=color,
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
            ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
    fig.suptitle(f"{title}\nlegend: log-log slope fitted over the {SLOPE_POINTS} largest T measured "
                 "(2 = quadratic in T, 1 = linear)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd or both (default: %(default)s)")
    parser.add_argument("--min-t", type=int, default=128, help="smallest context length, a power of two (default: %(default)s)")
    parser.add_argument("--max-t", type=int, default=None,
                        help="largest context length (default: 8192 on the CPU, 131072 on a GPU)")
    parser.add_argument("--batch", "-B", type=int, default=1, help="B (default: %(default)s)")
    parser.add_argument("--heads", "-H", type=int, default=12, help="H (default: %(default)s)")
    parser.add_argument("--head-dim", "-D", type=int, default=64, help="D (default: %(default)s)")
    parser.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.3 CPU, 0.1 GPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the sweep; points predicted not to fit are 'skipped (budget)' "
                             "(default: 150 on the CPU, 600 on a GPU; 0: no budget)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="memory the naive pre-check may assume (default: what the device has available)")
    args = parser.parse_args(argv)
    for name in ("min_t", "batch", "heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_t & (args.min_t - 1):
        parser.error(f"--min-t must be a power of two, got {args.min_t}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    args.modes = modes
    return args


def settings_from_args(args: argparse.Namespace, device: torch.device) -> Settings:
    max_t = args.max_t if args.max_t is not None else DEFAULT_MAX_T[device.type]
    if max_t < args.min_t:
        raise SystemExit(f"error: --max-t ({max_t}) is smaller than --min-t ({args.min_t})")
    t_values = [args.min_t * 2**i for i in range(int(math.log2(max_t // args.min_t)) + 1)]
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[device.type]
    memory = (int(args.memory_limit_gb * 2**30) if args.memory_limit_gb is not None
              else common.available_memory_bytes(device))
    return Settings(device=device, dtype=common.resolve_dtype(args.dtype, device), B=args.batch, H=args.heads,
                    D=args.head_dim, causal=not args.no_causal, t_values=t_values, modes=args.modes,
                    repeats=args.repeats, min_repeats=3,
                    target_s=args.target_s if args.target_s is not None else (0.1 if device.type == "cuda" else 0.3),
                    budget_s=budget if budget > 0 else None, memory_limit_bytes=memory)


def run(argv: Sequence[str] | None = None, impls: dict[str, AttentionFn] | None = None,
        show_progress: bool = True) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files").
    impls: attention functions to measure by name (default: fastgpt.attention per backend)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    settings = settings_from_args(args, device)
    unavailable: dict[str, str] = {}
    if impls is None:
        names, unavailable = common.usable_backends(args.backends, device)
        impls = {name: fastgpt_attention(name) for name in names}
    if not impls:
        raise SystemExit("error: no backend to measure: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    env = common.environment(device, argv, PROG)
    stem = (args.stem or env["device_kind"]) + "_attention"
    rows = run_sweep(settings, impls, show_progress)
    slopes = fitted_slopes(rows)
    unit, _ = _flops_unit(device)
    data = {
        "benchmark": "attention",
        "environment": env,
        "settings": {"B": settings.B, "H": settings.H, "D": settings.D, "causal": settings.causal,
                     "dtype": common.dtype_name(settings.dtype), "t_values": settings.t_values,
                     "modes": settings.modes, "backends": list(impls), "repeats": settings.repeats or "adaptive",
                     "target_s": settings.target_s, "budget_s": settings.budget_s,
                     "memory_limit_bytes": settings.memory_limit_bytes,
                     "timer": common.timer_description(device), "memory_measure": common.MEMORY_MEASURE[device.type],
                     "flops": "4·B·H·T²·D, halved when causal; fwd+bwd = 3.5x fwd (backward 2.5x)",
                     "flops_unit_in_tables": unit},
        "unavailable": unavailable,
        "results": rows,
        "slopes": slopes,
    }
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data, settings, f"{stem}.png"))
    paths["png"] = paths["md"][:-3] + ".png"
    shape = f"B={settings.B} H={settings.H} D={settings.D} {common.dtype_name(settings.dtype)}"
    plot(rows, settings, slopes, f"{'Causal' if settings.causal else 'Full'} attention vs context length, "
         f"{shape}: {env['device_name']}", paths["png"])
    data["files"] = paths
    common.print_report(tables(rows, settings) + "\n\n" + slopes_table(slopes), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
