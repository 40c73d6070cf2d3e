"""What every fastgpt benchmark shares: the machine description, the timer, the
peak-memory measure, out-of-memory handling, the log-log slope fit and the writers.

Timing (time_call):
- GPU: CUDA events around each call, the L2 cache flushed (a 256 MiB buffer zeroed)
  before each one so that small kernels do not run from a warm cache;
- CPU: time.perf_counter around each call.
Callers warm up first; time_call repeats until both `min_repeats` calls and `target_s`
seconds are spent (or exactly `repeats` calls) and reports the median.

Peak extra memory (peak_memory_bytes), for one call, its outputs included:
- GPU: torch.cuda.max_memory_allocated() minus the allocated bytes before the call;
- CPU: the peak of the running sum of allocations and frees that torch's CPU allocator
  reports to torch.profiler(profile_memory=True) during the call. Memory a kernel takes
  outside torch's allocator (a std::vector, the stack) is not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

import fastgpt
from fastgpt import backends

# Where a run writes unless told otherwise: a git-ignored folder, so that running a benchmark
# never overwrites the committed results of a checkout. Those (RESULTS_DIR) are rewritten
# only when asked for by name: `--out-dir benchmarks/results`, or `make bench-results`.
DEFAULT_OUT_DIR = os.path.join("benchmarks", "out")
RESULTS_DIR = os.path.join("benchmarks", "results")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it",
    "cpu": ("peak of the running sum of torch CPU-allocator allocations/frees during one call, from "
            "torch.profiler(profile_memory=True); memory a kernel takes outside torch's allocator is not counted"),
}
_L2_FLUSH_BYTES = 256 * 2**20
_l2_flush_buffer: torch.Tensor | None = None


# ---- the machine -----------------------------------------------------------------------

def resolve_device(name: str | None) -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1') or, when None, the GPU if there is one."""
    device = torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # equal to the .device of its tensors
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, or bfloat16 on a GPU / float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_kind(device: torch.device) -> str:
    """The file stem of a device's results: 'cpu', or the GPU model ('h100', 'a100', 'rtx4090')."""
    if device.type == "cpu":
        return "cpu"
    words = [w for w in re.findall(r"[A-Za-z0-9]+", device_name(device))
             if w.lower() not in ("nvidia", "geforce", "tesla", "amd", "radeon", "instinct")]
    if not words:
        return "gpu"
    kind = words[0].lower()
    if kind in ("rtx", "gtx", "quadro") and len(words) > 1:
        kind += words[1].lower()
    return kind


def cpu_level() -> str | None:
    """The vector ISA level of the loaded CPU kernels (default, avx2, avx512), or None."""
    from fastgpt import _extension
    return _extension.CPU_CAPABILITY


FMA_PEAK_MEASURE = ("float32 FMA peak: a loop of 16 independent Vectorized<float> FMA chains per torch "
                    "thread at the CPU kernels' level (csrc/cpu/fma_probe.cpp), median of 5 runs of "
                    "0.05-0.1 s, in this run")


def cpu_fma_peak_flops() -> float | None:
    """The float32 FLOP/s of an FMA loop on every torch thread (csrc/cpu/fma_probe.cpp), or None
    when the CPU kernels are not loaded."""
    if not hasattr(torch.ops, "fastgpt_bench") or not hasattr(torch.ops.fastgpt_bench, "fma_loop"):
        return None
    like = torch.empty(0)
    iterations = 1 << 16
    while True:  # until one run takes more than 0.05 s
        start = time.perf_counter()
        accumulators = torch.ops.fastgpt_bench.fma_loop(like, iterations)  # (threads, chains * lanes)
        if time.perf_counter() - start > 0.05:
            break
        iterations *= 2
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        torch.ops.fastgpt_bench.fma_loop(like, iterations)
        runs.append(time.perf_counter() - start)
    return accumulators.numel() * iterations * 2 / statistics.median(runs)


def git_commit() -> str | None:
    """The commit of the fastgpt checkout being measured (None outside a git checkout)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device, argv: Sequence[str], prog: str) -> dict:
    """Everything needed to tell where and how a result was measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device_kind": device_kind(device),
        "device": str(device),
        "device_name": device_name(device),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_level": cpu_level(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastgpt": fastgpt.__version__,
        "git_commit": git_commit(),
        "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def environment_lines(env: dict) -> list[str]:
    """The markdown lines that say where a result was measured."""
    versions = f"torch {env['torch']}" + (f", CUDA {env['cuda']}" if env["cuda"] else "")
    versions += f", triton {env['triton']}" if env["triton"] else ", no triton"
    hardware = (f"{env['gpu']} (host CPU: {env['cpu_model']}, {env['cpu_cores']} cores)" if env["gpu"]
                else f"{env['cpu_model']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads, "
                     f"CPU kernels at the {env.get('cpu_level') or 'no'} level")
    return [f"- command: `{env['command']}`",
            f"- device: {hardware}",
            f"- versions: {versions}, Python {env['python']}, fastgpt {env['fastgpt']}",
            f"- git commit: {env['git_commit'] or 'unknown'}; date {env['date']}"]


def usable_backends(requested: str | None, device: torch.device, candidates: Iterable[str] = backends.NAMES,
                    op: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(backends to measure, {backend: why it is unavailable on this device or has no kernel for `op`}).

    requested: comma-separated names, or None for every candidate available on the device
    (then a backend that never runs on this kind of device, cuda on the CPU, is not listed)."""
    report = fastgpt.info()
    if requested is None:
        names = [n for n in candidates if device.type in backends.REGISTRY[n].unavailable]
    else:
        names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in backends.NAMES]
    if unknown:
        raise SystemExit(f"error: unknown backend(s) {', '.join(unknown)}; expected some of {', '.join(backends.NAMES)}")
    usable, unavailable = [], {}
    for name in names:
        lacks = backends.REGISTRY[name].lacks(op) if op is not None else None
        if device.type not in report[name]["devices"]:
            unavailable[name] = backends.REGISTRY[name].why_not(device.type) or report[name]["reason"]
        elif lacks is not None:
            unavailable[name] = lacks
        else:
            usable.append(name)
    return usable, unavailable


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: every one available on the device)")
    add_output_arguments(parser)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--out-dir and --stem, the same for every benchmark."""
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where the result files go (default: %(default)s, git-ignored; {RESULTS_DIR} "
                             "holds the committed results: pass it to regenerate them)")
    parser.add_argument("--stem", default=None,
                        help="file stem of the results (default: the device kind, e.g. cpu, h100)")


# ---- timing ----------------------------------------------------------------------------

def timer_description(device: torch.device, flush_l2: bool = True) -> str:
    """How time_call times on this device, for the result files."""
    if device.type == "cpu":
        return "time.perf_counter, median over repeats after warm-up"
    flush = ", L2 flushed (256 MiB buffer zeroed) before each call" if flush_l2 else ""
    return "CUDA events, median over repeats after warm-up" + flush


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: torch.device) -> None:
    global _l2_flush_buffer
    if _l2_flush_buffer is None or _l2_flush_buffer.device != device:
        _l2_flush_buffer = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    _l2_flush_buffer.zero_()


@dataclass
class Timing:
    median_s: float
    repeats: int


def time_call(fn: Callable[[], object], device: torch.device, *, repeats: int | None = None,
              target_s: float = 0.3, min_repeats: int = 3, max_repeats: int = 200,
              flush_l2: bool = True) -> Timing:
    """Median seconds of fn(): exactly `repeats` calls, or as many as fit in target_s
    (at least min_repeats, at most max_repeats). The caller has warmed fn up."""
    times: list[float] = []
    start_wall = time.perf_counter()
    while True:
        if device.type == "cuda":
            if flush_l2:
                _flush_l2(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin_s)
        spent = time.perf_counter() - start_wall
        if repeats is not None:
            if len(times) >= repeats:
                break
        elif len(times) >= max_repeats or (len(times) >= min_repeats and spent >= target_s):
            break
    return Timing(statistics.median(times), len(times))


def warm_median_s(fn: Callable[[], object], device: torch.device, repeats: int | None, target_s: float) -> float:
    """Median seconds of fn() after two warm-up calls (see time_call)."""
    for _ in range(2):
        fn()
    synchronize(device)
    return time_call(fn, device, repeats=repeats, target_s=target_s).median_s


# ---- bandwidth-bound kernels (the norms): GB/s against the copy bandwidth --------------

OK, OOM, ERROR = "ok", "OOM", "error"


def copy_bandwidth(x: torch.Tensor, device: torch.device, repeats: int | None, target_s: float) -> dict:
    """The ceiling of a memory-bound kernel on x: dst.copy_(x) reads and writes x once."""
    destination = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    seconds = warm_median_s(lambda: destination.copy_(x), device, repeats, target_s)
    return {"bytes": nbytes, "time_us": seconds * 1e6, "gb_per_s": nbytes / seconds / 1e9}


def measure_bandwidth(row: dict, make_call: Callable[[], Callable[[], object]], nbytes: int, device: torch.device,
                      repeats: int | None, target_s: float, copy_gb_per_s: float) -> dict:
    """Times the call make_call() builds into `row`: status ok with time_us, gb_per_s (nbytes /
    median time) and percent_of_copy; or status OOM / error with a note (the sweep goes on)."""
    row["bytes"] = nbytes
    try:
        seconds = warm_median_s(make_call(), device, repeats, target_s)
    except Exception as error:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        oom = is_out_of_memory(error)
        if oom:
            release_memory(device)
        row.update(status=OOM if oom else ERROR,
                   note=f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
        return row
    gbs = nbytes / seconds / 1e9
    row.update(status=OK, time_us=seconds * 1e6, gb_per_s=gbs, percent_of_copy=100 * gbs / copy_gb_per_s)
    return row


def add_speedups(results: list[dict], baseline: str, group: Sequence[str], field: str = "speedup_vs_torch") -> None:
    """row[field] = the baseline impl's time / the row's time, among rows that agree on `group`."""
    times = {tuple(r[k] for k in group): r["time_us"] for r in results if r["impl"] == baseline and r["status"] == OK}
    for row in results:
        base = times.get(tuple(row[k] for k in group))
        if row["status"] == OK and base is not None:
            row[field] = base / row["time_us"]


def bandwidth_cell(row: dict) -> str:
    """'123 (45%)': GB/s and % of copy, or the failure status."""
    return f"{fmt(row['gb_per_s'])} ({row['percent_of_copy']:.0f}%)" if row["status"] == OK else row["status"]


def speedup_cell(row: dict, field: str = "speedup_vs_torch") -> str:
    speedup = row.get(field)
    return f"{speedup:.2f}x" if speedup is not None else "—"


def not_measured_lines(unavailable: dict[str, str]) -> list[str]:
    """The markdown lines naming each backend a benchmark did not measure, and why ([] when none)."""
    if not unavailable:
        return []
    return ["Not measured:", "", *(f"- {name}: {why}" for name, why in unavailable.items()), ""]


def failure_lines(results: list[dict], describe: Callable[[dict], str]) -> str:
    """The 'Failures:' section of a result table ('' when every point ran)."""
    failures = [r for r in results if r["status"] != OK]
    if not failures:
        return ""
    return "Failures:\n\n" + "\n".join(f"- {describe(r)}: {r['status']}: {r['note']}" for r in failures)


# ---- memory ----------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on the C-level stderr at every profile; keep them off
    the progress bar. Python exceptions are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(profiler) -> int:
    """Peak of the running sum of the allocation (+) and free (-) events a profile recorded."""
    from torch._C._profiler import _EventType

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra memory of one call of fn() (its outputs included); see MEMORY_MEASURE."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
        del result
    return _cpu_allocation_peak(profiler)


def available_memory_bytes(device: torch.device) -> int:
    """What a new allocation can still get: free GPU memory plus what torch's caching
    allocator holds unused, or the CPU's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or the CPU allocator's RuntimeError."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, (oom_type, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_memory(device: torch.device) -> None:
    """After an out-of-memory error: drop the failed call's tensors and the cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- analysis and output ---------------------------------------------------------------

def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 2 for y ∝ x², 1 for y ∝ x.
    None with fewer than two usable (positive) points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    var_x = sum((p[0] - mean_x) ** 2 for p in points)
    if var_x == 0:
        return None
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / var_x


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table whose columns are padded, so it reads in a terminal too."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits ('—' for None)."""
    if value is None:
        return "—"
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def write_outputs(out_dir: str, stem: str, data: dict, markdown: str) -> dict[str, str]:
    """Writes <out_dir>/<stem>.json and .md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown.rstrip() + "\n")
    return paths


def print_report(tables: str, unavailable: dict[str, str], paths: dict[str, str]) -> None:
    """The terminal end of every benchmark: its tables, what was not measured and why, the files."""
    print(tables)
    for name, why in unavailable.items():
        print(f"not measured: {name}: {why}")
    print(f"\nwrote {', '.join(paths.values())}")


def main_of(run: Callable[..., dict]) -> Callable[..., int]:
    """The main(argv) of a benchmark module whose run(argv) measures, writes the files and
    prints the report: what `fastgpt bench <name>` and benchmarks/<name>.py call."""
    def main(argv: Sequence[str] | None = None) -> int:
        run(argv)
        return 0

    main.__doc__ = f"Runs {run.__module__} from the command line (argv: sys.argv[1:] when None); returns 0."
    return main


def progress(total: int, desc: str):
    """The live progress bar every benchmark shows (on stderr)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pt", dynamic_ncols=True, leave=True)
