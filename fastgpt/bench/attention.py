"""Attention against context length: time and peak memory of every backend, in three scenarios.

    fastgpt bench attention [--scenario context|gqa|window] [--device cpu|cuda] [--max-t T] ...
    fastgpt bench context ...                           (an alias)
    python benchmarks/attention.py ...                  (the same program)

For T = min_t, 2·min_t, ..., max_t and for the forward pass (fwd) and forward +
backward (fwdbwd) of fastgpt.attention(q, k, v, causal=True, window=W, backend=b) with
q (B, H, T, D) and k, v (B, Hkv, T, D), it records the median time, the peak extra memory,
FLOP/s and the speed ratios against the baselines measured in the same run. Scenarios
(SCENARIOS: their shapes and series; every flag below overrides them):
- context: the book's GPT-2 heads (H 12, D 64), every backend, naive included: how the
  (T, T) score matrices of the book's attention cost quadratic memory and time;
- gqa: Llama-3-8B heads (Hq 32, Hkv 8, D 128), each backend with GQA and again as MHA
  (Hkv = Hq, the same query heads): ratios vs sdpa (enable_gqa) and vs MHA;
- window: sliding windows W (256, 1024) next to full causal attention of the same backend,
  and compiled FlexAttention with a sliding-window block mask: ratios vs full causal,
  vs sdpa (a boolean (T, T) window mask) and vs flex;
- bf16: the context heads in bfloat16, each backend again in float32 (its "fp32" twin): ratios
  vs sdpa in the same dtype and vs the same backend in float32 (what bf16 dot products buy).
Writes <out-dir>/<stem>_attention[_<scenario>].json, .md and .png (stem: the device kind,
e.g. cpu, h100; the context scenario has no suffix).

A point that cannot run is a row, never a gap:
- "OOM": the backend ran out of memory (torch.OutOfMemoryError, MemoryError, the CPU
  allocator's error), or, for naive, the pre-check found that its (T, T) score
  matrices would not fit in the memory available; larger T are not tried;
- "skipped (budget)": the time predicted from the previous T (time ∝ T², or ∝ T once T
  exceeds the window) does not fit in this series' share of the time budget; larger T are
  not tried either;
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
from fastgpt import backends
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
FLEX = "flex"  # compiled torch FlexAttention: a baseline of the window scenario, not a fastgpt backend
OK, OOM, SKIPPED, ERROR = "ok", "OOM", "skipped (budget)", "error"
COLORS = {"naive": "#d62728", "sdpa": "#444444", "cpu": "#1f77b4", "cuda": "#2ca02c", "triton": "#9467bd",
          FLEX: "#ff7f0e"}
SLOPE_POINTS = 4  # the slope is fitted over the largest T measured (the asymptotic regime)

# (q, k, v, causal, window) -> out; window None = no window
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, "int | None"], torch.Tensor]


@dataclass(frozen=True)
class Scenario:
    """The defaults of one kind of sweep (see the module docstring)."""
    heads: int
    kv_heads: int | None  # None: as many as query heads (MHA)
    head_dim: int
    min_t: int
    max_t: dict[str, int]     # device type -> largest T
    budget_s: dict[str, float]
    windows: tuple[int, ...] = ()  # sliding windows measured next to full causal attention
    with_naive: bool = True   # the book's attention (off where its (T, T) matrices only repeat the context story)
    with_flex: bool = False   # compiled FlexAttention for each window
    dtype: str | None = None  # the series' dtype (default: --dtype, else bfloat16 on a GPU / float32 on the CPU)
    float32_twins: bool = False  # each backend again in float32
    title: str = "Causal attention vs context length"


SCENARIOS = {
    "context": Scenario(12, None, 64, 128, {"cpu": 8192, "cuda": 131072}, {"cpu": 150.0, "cuda": 600.0}),
    "gqa": Scenario(32, 8, 128, 1024, {"cpu": 8192, "cuda": 65536}, {"cpu": 1200.0, "cuda": 600.0},
                    with_naive=False, title="Grouped-query attention (Llama-3-8B heads) vs context length"),
    "window": Scenario(8, None, 128, 1024, {"cpu": 16384, "cuda": 131072}, {"cpu": 1200.0, "cuda": 600.0},
                       windows=(256, 1024), with_naive=False, with_flex=True,
                       title="Sliding-window attention vs context length"),
    "bf16": Scenario(12, None, 64, 1024, {"cpu": 8192, "cuda": 131072}, {"cpu": 600.0, "cuda": 600.0},
                     with_naive=False, dtype="bfloat16", float32_twins=True,
                     title="bfloat16 causal attention vs context length"),
}


def visible_pairs(T: int, causal: bool, window: int | None) -> float:
    """(query, key) pairs T queries see over T keys: T² (full), T²/2 (causal, the usual count that
    leaves out the diagonal's T/2), and with a window W < T: T·W - W²/2 (causal, the same
    convention, continuous at W = T) or T·(2W - 1) - W·(W - 1) (non-causal, exact)."""
    if window is None or window >= T:
        return T * T * (0.5 if causal else 1.0)
    return T * window - window * window / 2 if causal else T * (2.0 * window - 1) - window * (window - 1)


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str, window: int | None = None) -> float:
    """4·B·H·D per visible (query, key) pair (two matmuls of 2·D each); fwd+bwd 3.5x."""
    return 4.0 * B * H * D * visible_pairs(T, causal, window) * MODE_FLOP_FACTOR[mode]


def naive_peak_bytes(B: int, H: int, T: int, dtype: torch.dtype) -> int:
    """What the naive backend needs at its peak for context T (see NAIVE_LIVE_SCORE_MATRICES)."""
    element = torch.finfo(dtype).bits // 8
    return NAIVE_LIVE_SCORE_MATRICES * B * H * T * T * element + T * T


def fastgpt_attention(backend: str) -> AttentionFn:
    return lambda q, k, v, causal, window: fastgpt.attention(q, k, v, causal=causal, window=window, backend=backend)


def flex_attention(compiled: bool = True) -> tuple[AttentionFn | None, str | None]:
    """(FlexAttention with a sliding-window block mask, torch.compile-d, None) or (None, why not).
    The block mask of each (T, window) is built once, outside the timed calls; compiled=False
    runs it eagerly (slow: for checking the mask)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex
    except ImportError as error:
        return None, f"this torch has no FlexAttention ({error})"
    # Each (T, window, grad mode) is a recompilation; past dynamo's limit (8) flex_attention would
    # silently fall back to its eager path, which materialises (T, T) scores. Raise the limit for the
    # sweep, and make hitting it an error (an "error" row) rather than a different algorithm.
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True
    run_flex = torch.compile(flex, dynamic=False) if compiled else flex
    block_masks: dict = {}

    def attend(q, k, v, causal, window):
        T = q.shape[-2]
        key = (T, causal, window, q.device)
        if key not in block_masks:
            def visible(b, h, q_idx, kv_idx):
                near = (q_idx - kv_idx < window) if causal else ((q_idx - kv_idx).abs() < window)
                return near & (q_idx >= kv_idx) if causal else near
            block_masks[key] = create_block_mask(visible, None, None, T, k.shape[-2], device=q.device)
        return run_flex(q, k, v, block_mask=block_masks[key], enable_gqa=k.shape[1] != q.shape[1])
    return attend, None


@dataclass
class Settings:
    scenario: str
    device: torch.device
    dtype: torch.dtype
    B: int
    H: int
    kv_heads: int
    D: int
    causal: bool
    windows: list[int]
    t_values: list[int]
    modes: list[str]
    repeats: int | None  # None: adaptive (min_repeats .. target_s per point)
    min_repeats: int
    target_s: float
    budget_s: float | None  # None: no budget
    memory_limit_bytes: int


@dataclass
class Series:
    """The sweep over T of one (mode, backend, window, kv heads)."""
    mode: str
    backend: str
    window: int | None = None
    kv_heads: int | None = None  # None: the settings' kv_heads
    dtype: torch.dtype | None = None  # None: the settings' dtype
    label: str = ""  # how tables, plots and slopes name it; the backend when there is one series per backend
    last_point: tuple[int, float] | None = None  # (T, median seconds) of the last measured point
    stopped: tuple[str, str] | None = None  # (status, note) once a T failed: larger T are not run
    rows: list[dict] = field(default_factory=list)


def make_series(settings: Settings, backends: Sequence[str]) -> list[Series]:
    """Every (mode, backend) series, times the windows, the MHA twin of a GQA sweep and the
    float32 twin of a bfloat16 one. flex runs only with a window (its block mask is the point)
    and only forward on the CPU (torch has no CPU backward for FlexAttention)."""
    variants: list[tuple[int | None, int, torch.dtype, str]] = [(None, settings.kv_heads, settings.dtype, "")]
    if settings.kv_heads != settings.H:
        variants.append((None, settings.H, settings.dtype, " MHA"))
    if SCENARIOS[settings.scenario].float32_twins and settings.dtype != torch.float32:
        variants.append((None, settings.kv_heads, torch.float32, " fp32"))
    variants += [(w, settings.kv_heads, settings.dtype, f" W={w}") for w in settings.windows]
    series = []
    for mode in settings.modes:
        for backend in backends:
            for window, kv_heads, dtype, suffix in variants:
                if backend == FLEX and (window is None or (mode != "fwd" and settings.device.type == "cpu")):
                    continue
                series.append(Series(mode, backend, window, kv_heads, dtype, backend + suffix))
    return series


def _inputs(settings: Settings, series: Series, T: int):
    """q (B, H, T, D), k, v (B, Hkv, T, D) and, for fwdbwd, the output gradient (B, H, T, D);
    the same numbers for every series at this T."""
    gen = torch.Generator(settings.device).manual_seed(T)

    def randn(heads):
        return torch.randn((settings.B, heads, T, settings.D), generator=gen, device=settings.device,
                           dtype=series.dtype or settings.dtype)

    q, k, v = randn(settings.H), randn(series.kv_heads), randn(series.kv_heads)
    if series.mode == "fwd":
        return q, k, v, None
    grad_out = randn(settings.H)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out


def _call(attn: AttentionFn, settings: Settings, series: Series, T: int) -> Callable[[], object]:
    q, k, v, grad_out = _inputs(settings, series, T)
    if series.mode == "fwd":
        def forward():
            with torch.no_grad():
                return attn(q, k, v, settings.causal, series.window)
        return forward
    return lambda: torch.autograd.grad(attn(q, k, v, settings.causal, series.window), (q, k, v), grad_out)


def _needs_warmup(series: Series, device: torch.device) -> bool:
    """On the CPU the memory-measuring call is the warm-up; a GPU (Triton compiles and autotunes
    on its first call) and torch.compile (flex) get a plain one first."""
    return device.type == "cuda" or series.backend == FLEX


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
    linear = series.window is not None and series.window <= last_t and series.backend not in MATERIALISES_SCORES
    predicted_call_s = last_s * (T / last_t) ** (1 if linear else 2)
    calls = 1 + _needs_warmup(series, settings.device) + (settings.repeats or settings.min_repeats)
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
        fn = _call(attn, settings, series, T)  # allocates the inputs: may run out of memory too
        if _needs_warmup(series, device):
            fn()
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
    flops = attention_flops(settings.B, settings.H, T, settings.D, settings.causal, series.mode, series.window)
    return {"status": OK, "time_ms": timing.median_s * 1e3, "repeats": timing.repeats,
            "memory_mb": peak / 2**20, "flops": flops, "flop_per_s": flops / timing.median_s}


def run_sweep(settings: Settings, impls: dict[str, AttentionFn], show_progress: bool = True) -> list[dict]:
    """Every (series, T) point as a row; see the module docstring for the statuses."""
    series = make_series(settings, list(impls))
    started = time.perf_counter()
    bar = common.progress(len(series) * len(settings.t_values), "attention") if show_progress else None
    for T in settings.t_values:
        for one in series:
            if bar is not None:
                bar.set_postfix_str(f"{one.label} {one.mode} T={T}")
            row = {"backend": one.backend, "series": one.label, "window": one.window, "kv_heads": one.kv_heads,
                   "dtype": common.dtype_name(one.dtype or settings.dtype), "mode": one.mode, "T": T}
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
    _add_ratios(rows, settings)
    return rows


# speedup_vs_<name> = time of the baseline point / time of this point, both from this run. A
# baseline is the same point with one thing changed: the backend (naive, sdpa, flex: at the same
# window and kv heads), the window dropped (full: full causal attention of the same backend) or
# the kv heads raised to the query heads (mha: the same backend without grouping) or the dtype
# float32 (fp32: the same backend without bfloat16). Backend baselines run in the row's dtype.
RATIOS = ("naive", "sdpa", "flex", "full", "mha", "fp32")


def _baseline_key(row: dict, name: str, settings: Settings) -> tuple | None:
    mode, T, backend, window, kv_heads = row["mode"], row["T"], row["backend"], row["window"], row["kv_heads"]
    dtype = row["dtype"]
    if name in ("naive", "sdpa", "flex"):
        return mode, T, name, window, kv_heads, dtype  # 1.00x on the baseline's own rows
    if name == "full":
        return (mode, T, backend, None, kv_heads, dtype) if window is not None else None
    if name == "fp32":
        return (mode, T, backend, window, kv_heads, "float32") if dtype != "float32" else None
    return (mode, T, backend, window, settings.H, dtype) if kv_heads != settings.H else None


def _add_ratios(rows: list[dict], settings: Settings) -> None:
    times = {(r["mode"], r["T"], r["backend"], r["window"], r["kv_heads"], r["dtype"]): r["time_ms"]
             for r in rows if r["status"] == OK}
    for row in rows:
        for name in RATIOS:
            base = times.get(_baseline_key(row, name, settings))
            if row["status"] == OK and base is not None:
                row[f"speedup_vs_{name}"] = base / row["time_ms"]


def fitted_slopes(rows: list[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{mode: {series: {"time": slope, "memory": slope}}}: log-log slopes over the largest
    SLOPE_POINTS measured T (memory ∝ T² gives 2, ∝ T gives 1)."""
    slopes: dict = {}
    for row in rows:
        slopes.setdefault(row["mode"], {}).setdefault(row["series"], None)
    for mode, by_series in slopes.items():
        for label in by_series:
            ok = [r for r in rows if r["mode"] == mode and r["series"] == label and r["status"] == OK]
            tail = ok[-SLOPE_POINTS:]
            ts = [r["T"] for r in tail]
            by_series[label] = {"time": common.loglog_slope(ts, [r["time_ms"] for r in tail]),
                                "memory": common.loglog_slope(ts, [r["memory_mb"] for r in tail])}
    return slopes


def first_failure(rows: list[dict], mode: str, series: str) -> dict | None:
    """The first row of a series that did not run (OOM or skipped), if any."""
    for row in rows:
        if row["mode"] == mode and row["series"] == series and row["status"] in (OOM, SKIPPED):
            return row
    return None


# ---- output ----------------------------------------------------------------------------

def _flops_unit(device: torch.device) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)


def _ratio(speedup: float | None) -> str:
    return "—" if speedup is None else f"{speedup:.2f}x"


def tables(rows: list[dict], settings: Settings, peak_flops: float | None = None) -> str:
    """One table per mode; with the measured FMA peak (CPU), a column of each row's share of it."""
    unit, scale = _flops_unit(settings.device)
    ratios = [name for name in RATIOS if any(f"speedup_vs_{name}" in r for r in rows)]
    peak_header = ["% of fp32 FMA peak"] if peak_flops else []
    parts = []
    for mode in settings.modes:
        body = []
        for row in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["T"]):
            ok = row["status"] == OK
            body.append([row["T"], row["series"],
                         common.fmt(row["time_ms"]) if ok else "—",
                         common.fmt(row["memory_mb"]) if ok else "—",
                         common.fmt(row["flop_per_s"] / scale) if ok else "—",
                         *([f"{100 * row['flop_per_s'] / peak_flops:.0f}%" if ok else "—"] if peak_flops else []),
                         *(_ratio(row.get(f"speedup_vs_{name}")) for name in ratios),
                         row["status"] if ok else f"{row['status']}: {row['note']}"])
        parts.append(f"### {MODES[mode]} ({mode})\n\n" + common.markdown_table(
            ["T", "backend", "time ms", "memory MB", unit, *peak_header, *(f"vs {name}" for name in ratios),
             "status"], body))
    return "\n\n".join(parts)


def slopes_table(slopes: dict) -> str:
    body = [[MODES[mode], label, common.fmt(s["time"], 2), common.fmt(s["memory"], 2)]
            for mode, by_series in slopes.items() for label, s in by_series.items()]
    return common.markdown_table(["pass", "backend", "time slope", "memory slope"], body)


RATIO_MEANINGS = {
    "naive": "the book's matmul attention (fastgpt backend naive)",
    "sdpa": "F.scaled_dot_product_attention (enable_gqa for GQA; an explicit boolean (T, T) mask for a window)",
    "flex": "torch.compile(flex_attention) with a sliding-window block mask (built outside the timed calls)",
    "full": "the same backend without the window (full causal attention)",
    "mha": "the same backend with Hkv = Hq (MHA: the same query heads, no grouping)",
    "fp32": "the same backend in float32 (inputs drawn from the same generator)",
}


def _shape(settings: Settings) -> str:
    heads = f"H={settings.H}" if settings.kv_heads == settings.H else f"Hq={settings.H}, Hkv={settings.kv_heads}"
    windows = f", windows W = {', '.join(map(str, settings.windows))}" if settings.windows else ""
    return (f"B={settings.B}, {heads}, D={settings.D}, {'causal' if settings.causal else 'non-causal'}, "
            f"{common.dtype_name(settings.dtype)}{windows}")


def markdown(data: dict, settings: Settings, png_name: str) -> str:
    env = data["environment"]
    ratios = [name for name in RATIOS if any(f"speedup_vs_{name}" in r for r in data["results"])]
    lines = [f"# {SCENARIOS[settings.scenario].title}: {env['device_name']}", "",
             *common.environment_lines(env),
             f"- shape: q (B, Hq, T, D), k, v (B, Hkv, T, D) with {_shape(settings)}; "
             f"T = {settings.t_values[0]} .. {settings.t_values[-1]}",
             f"- time: {data['settings']['timer']}",
             f"- memory: peak extra memory of one call, outputs included: {data['settings']['memory_measure']}",
             f"- FLOPs: {data['settings']['flops']}",
             *([f"- peak: {common.fmt(data['settings']['fma_peak_flops'] / 1e9)} GFLOP/s, the "
                f"{common.FMA_PEAK_MEASURE}"] if data["settings"].get("fma_peak_flops") else []),
             "- vs X: speedup = time of X / time of this row, both measured in this run; X is "
             + "; ".join(f"{name}: {RATIO_MEANINGS[name]}" for name in ratios),
             f"- slopes: least-squares log-log slope over the {SLOPE_POINTS} largest T measured "
             "(2: quadratic in T, 1: linear)", ""]
    if FLEX in data["settings"]["backends"]:
        lines[-1:-1] = ["- flex runs only with a window" + (", forward only (torch has no CPU backward for "
                        "FlexAttention)" if settings.device.type == "cpu" else "")]
    lines += common.not_measured_lines(data["unavailable"])
    lines += [f"![time and memory vs T]({png_name})", "",
              tables(data["results"], settings, data["settings"].get("fma_peak_flops")), "",
              "### fitted log-log slopes", "", slopes_table(data["slopes"])]
    return "\n".join(lines)


def _t_label(T: int) -> str:
    return f"{T // 1024}k" if T >= 1024 else str(T)


def _line_style(series_rows: list[dict], settings: Settings) -> str:
    """Solid: the scenario's main series; dashed: the MHA twin or the largest window; dotted: smaller windows."""
    row = series_rows[0]
    if row["kv_heads"] != settings.kv_heads:
        return "--"
    if row["window"] is None:
        return "-"
    return "--" if row["window"] == max(settings.windows) else ":"


def plot(rows: list[dict], settings: Settings, slopes: dict, title: str, path: str) -> None:
    """2 x len(modes) panels: time (top) and memory (bottom) vs T, log-log, per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = settings.modes
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9.5), squeeze=False)
    series_seen = list(dict.fromkeys(r["series"] for r in rows))
    metrics = (("time_ms", "time", "median time (ms)"), ("memory_mb", "memory", "peak extra memory (MB)"))
    for col, mode in enumerate(modes):
        for row_index, (key, slope_key, ylabel) in enumerate(metrics):
            ax = axes[row_index][col]
            failures = []
            for label in series_seen:
                of_series = [r for r in rows if r["mode"] == mode and r["series"] == label]
                if not of_series:
                    continue
                ok = [r for r in of_series if r["status"] == OK]
                color = COLORS.get(of_series[0]["backend"])
                slope = slopes.get(mode, {}).get(label, {}).get(slope_key)
                legend = label + (f"  (slope {slope:.2f})" if slope is not None else "")
                if ok:
                    ax.plot([r["T"] for r in ok], [r[key] for r in ok], marker="o", markersize=4,
                            linewidth=1.8, color=color, linestyle=_line_style(of_series, settings), label=legend)
                failure = first_failure(rows, mode, label)
                if failure is not None:
                    failures.append((label, failure, color))
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
            for i, (label, failure, color) in enumerate(failures):
                # A dotted line where the series stops, labelled along it (left, then right of it).
                ax.axvline(failure["T"], color=color, linestyle=":", linewidth=1.6)
                ax.annotate(f"{label}: {failure['status']}",
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
    parser.add_argument("--scenario", default="context", choices=list(SCENARIOS),
                        help="its shapes, T range, windows and series are the defaults below (default: %(default)s)")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd or both (default: %(default)s)")
    parser.add_argument("--min-t", type=int, default=None, help="smallest context length, a power of two")
    parser.add_argument("--max-t", type=int, default=None, help="largest context length")
    parser.add_argument("--batch", "-B", type=int, default=1, help="B (default: %(default)s)")
    parser.add_argument("--heads", "-H", type=int, default=None, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hkv, a divisor of Hq")
    parser.add_argument("--head-dim", "-D", type=int, default=None, help="D")
    parser.add_argument("--windows", default=None,
                        help="comma-separated sliding windows measured next to full causal attention ('' for none)")
    parser.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default: adaptive, at least 3 and about --target-s seconds)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="adaptive repeats: seconds of timed calls per point (default 0.3 CPU, 0.1 GPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of the sweep; points predicted not to fit are 'skipped (budget)' "
                             "(default: the scenario's; 0: no budget)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="memory the naive pre-check may assume (default: what the device has available)")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.heads = scenario.heads if args.heads is None else args.heads
    args.kv_heads = (scenario.kv_heads or args.heads) if args.kv_heads is None else args.kv_heads
    args.head_dim = scenario.head_dim if args.head_dim is None else args.head_dim
    args.min_t = scenario.min_t if args.min_t is None else args.min_t
    for name in ("min_t", "batch", "heads", "kv_heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    if args.min_t & (args.min_t - 1):
        parser.error(f"--min-t must be a power of two, got {args.min_t}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    args.modes = modes
    if args.windows is None:
        args.windows = list(scenario.windows)
    else:
        try:
            args.windows = sorted({int(w) for w in args.windows.split(",") if w.strip()})
        except ValueError:
            parser.error(f"--windows takes comma-separated positive integers, got {args.windows!r}")
        if any(w < 1 for w in args.windows):
            parser.error(f"--windows must be >= 1, got {args.windows}")
    return args


def settings_from_args(args: argparse.Namespace, device: torch.device) -> Settings:
    scenario = SCENARIOS[args.scenario]
    max_t = args.max_t if args.max_t is not None else scenario.max_t[device.type]
    if max_t < args.min_t:
        raise SystemExit(f"error: --max-t ({max_t}) is smaller than --min-t ({args.min_t})")
    t_values = [args.min_t * 2**i for i in range(int(math.log2(max_t // args.min_t)) + 1)]
    budget = args.budget_s if args.budget_s is not None else scenario.budget_s[device.type]
    memory = (int(args.memory_limit_gb * 2**30) if args.memory_limit_gb is not None
              else common.available_memory_bytes(device))
    return Settings(scenario=args.scenario, device=device,
                    dtype=common.resolve_dtype(args.dtype or scenario.dtype, device),
                    B=args.batch, H=args.heads, kv_heads=args.kv_heads, D=args.head_dim, causal=not args.no_causal,
                    windows=args.windows, t_values=t_values, modes=args.modes,
                    repeats=args.repeats, min_repeats=3,
                    target_s=args.target_s if args.target_s is not None else (0.1 if device.type == "cuda" else 0.3),
                    budget_s=budget if budget > 0 else None, memory_limit_bytes=memory)


def default_impls(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, AttentionFn], dict[str, str]]:
    """fastgpt.attention per usable backend (naive only where the scenario has it, or asked
    for by name) and flex where the scenario has it (or asked for); {name: why not} for the rest."""
    scenario = SCENARIOS[args.scenario]
    requested = None if args.backends is None else [n.strip() for n in args.backends.split(",") if n.strip()]
    want_flex = scenario.with_flex if requested is None else FLEX in requested
    candidates = [n for n in backends.NAMES if scenario.with_naive or n != "naive"]
    names, unavailable = common.usable_backends(
        None if requested is None else ",".join(n for n in requested if n != FLEX), device, candidates)
    impls = {name: fastgpt_attention(name) for name in names}
    if want_flex:
        flex, why_not = flex_attention()
        if flex is None:
            unavailable[FLEX] = why_not
        else:
            impls[FLEX] = flex
    return impls, unavailable


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
        impls, unavailable = default_impls(args, device)
    if not impls:
        raise SystemExit("error: no backend to measure: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    env = common.environment(device, argv, PROG)
    stem = (args.stem or env["device_kind"]) + "_attention" + ("" if args.scenario == "context" else f"_{args.scenario}")
    peak_flops = common.cpu_fma_peak_flops() if device.type == "cpu" else None
    rows = run_sweep(settings, impls, show_progress)
    slopes = fitted_slopes(rows)
    unit, _ = _flops_unit(device)
    data = {
        "benchmark": "attention",
        "environment": env,
        "settings": {"scenario": settings.scenario, "B": settings.B, "H": settings.H, "kv_heads": settings.kv_heads,
                     "D": settings.D, "causal": settings.causal, "windows": settings.windows,
                     "dtype": common.dtype_name(settings.dtype), "t_values": settings.t_values,
                     "modes": settings.modes, "backends": list(impls), "repeats": settings.repeats or "adaptive",
                     "target_s": settings.target_s, "budget_s": settings.budget_s,
                     "memory_limit_bytes": settings.memory_limit_bytes,
                     "timer": common.timer_description(device), "memory_measure": common.MEMORY_MEASURE[device.type],
                     "flops": ("4·B·Hq·D per visible (query, key) pair: T²/2 causal, T·W - W²/2 causal with a "
                               "window W < T (visible_pairs); fwd+bwd = 3.5x fwd (backward 2.5x)"),
                     "flops_unit_in_tables": unit, "fma_peak_flops": peak_flops},
        "unavailable": unavailable,
        "results": rows,
        "slopes": slopes,
    }
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data, settings, f"{stem}.png"))
    paths["png"] = paths["md"][:-3] + ".png"
    plot(rows, settings, slopes, f"{SCENARIOS[settings.scenario].title}, {_shape(settings)}: {env['device_name']}",
         paths["png"])
    data["files"] = paths
    common.print_report(tables(rows, settings, peak_flops) + "\n\n" + slopes_table(slopes), unavailable, paths)
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
