"""Context parallelism: per-rank peak memory and time of a ring-attention training step against the
context length, for 1, 2 and 4 processes of this machine (gloo on localhost), and the longest
context that fits a fixed per-rank memory budget.

    fastgpt bench context-parallel [--world-sizes 1,2,4] [--lengths 2048,4096,8192,16384]
                                   [--heads 2] [--head-dim 64] [--memory-budget-mb 32] ...

A step: ring_attention (fastgpt.distributed, causal, float32, the cpu backend's kernels) forward
and backward on each rank's zigzag shards q, k, v (B, H, T/N, D). Baseline, measured in the
same run: fastgpt.attention forward and backward on the whole sequence in one process.
Time: the median over repeats of the wall time from a barrier before the step to a barrier after
it (the slowest rank). Memory: each rank's peak extra memory during one step (see
fastgpt.bench.common.MEMORY_MEASURE), the maximum over the ranks. The processes share this
machine's cores (torch threads per rank: cores // N, at least 1), so with N above the core count
time does not fall with N: here the memory per rank is the point, and the time the cost of the
ring's exchanges and merges. Writes <out-dir>/<stem>_context_parallel.json, .md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

import fastgpt
from fastgpt.bench import common
from fastgpt.distributed import ring_attention, spawn_local_group

WORLD_SIZES = (1, 2, 4)
LENGTHS = (2048, 4096, 8192, 16384)
HEADS, HEAD_DIM, BATCH = 2, 64, 1
MEMORY_BUDGET_MB = 32.0
BASELINE = "fastgpt.attention"  # the whole sequence in one process
TIMEOUT_S = 1200


def _series(row: dict) -> str:
    return BASELINE if row["impl"] == BASELINE else f"ring, {row['world']} rank{'s' * (row['world'] > 1)}"


def _step(attend, shape: tuple[int, ...]):
    """One training step of attend on fresh (B, H, T, D) q, k, v: forward and backward."""
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def step():
        attend(q, k, v).backward(grad)
        for t in (q, k, v):
            t.grad = None

    return step


def _measure(step, repeats: int, world: int) -> dict:
    """time_ms (median, barrier to barrier) and peak_mb (max over the ranks) of step()."""
    step()  # warm-up
    peak = torch.tensor([float(common.peak_memory_bytes(step, torch.device("cpu")))])
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        begin = time.perf_counter()
        step()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - begin)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"time_ms": sorted(times)[len(times) // 2] * 1e3, "peak_mb": peak.item() / 2**20}


def _rank_main(rank: int, world: int, port: int, settings: dict, out_path: str) -> None:
    """One rank of a world: every length's ring step (rank 0 writes the rows; with world 1, also
    the baseline's)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    torch.manual_seed(rank)
    rows = []
    for T in settings["lengths"]:
        shape = (settings["batch"], settings["heads"], T // world, settings["head_dim"])
        ring = _step(lambda q, k, v: ring_attention(q, k, v, causal=True, backend="cpu"), shape)
        rows.append({"impl": "ring", "world": world, "T": T, **_measure(ring, settings["repeats"], world)})
        if world == 1:
            whole = _step(lambda q, k, v: fastgpt.attention(q, k, v, causal=True, backend="cpu"), shape)
            rows.append({"impl": BASELINE, "world": 1, "T": T, **_measure(whole, settings["repeats"], 1)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure_world(world: int, settings: dict, out_dir: str, timeout_s: float) -> list[dict]:
    """The rows of `world` spawned processes (killed after timeout_s)."""
    out_path = os.path.join(out_dir, f"world{world}.json")
    if not spawn_local_group(_rank_main, world, (settings, out_path), timeout_s):
        raise SystemExit(f"fastgpt bench context-parallel: {world} processes did not finish in {timeout_s:.0f} s")
    with open(out_path) as f:
        return json.load(f)


def add_ratios(rows: list[dict]) -> None:
    """Each ring row's time and peak memory against the baseline's at the same T."""
    baseline = {r["T"]: r for r in rows if r["impl"] == BASELINE}
    for row in rows:
        base = baseline.get(row["T"])
        if row["impl"] != BASELINE and base is not None:
            row["time_vs_baseline"] = row["time_ms"] / base["time_ms"]
            row["memory_vs_baseline"] = row["peak_mb"] / base["peak_mb"]


def longest_under_budget(rows: list[dict], budget_mb: float) -> dict[str, int | None]:
    """series -> the longest T measured whose per-rank peak fits budget_mb (None: none does)."""
    longest: dict[str, int | None] = {}
    for row in rows:
        fits = row["T"] if row["peak_mb"] <= budget_mb else None
        current = longest.get(_series(row))
        longest[_series(row)] = max(filter(None, (current, fits)), default=None)
    return longest


def table(rows: list[dict], lengths: Sequence[int]) -> str:
    series = list(dict.fromkeys(_series(r) for r in rows))
    cell = {(_series(r), r["T"]): r for r in rows}
    headers = ["T"] + [f"{name}: ms / MB per rank" for name in series]
    lines = []
    for T in lengths:
        line = [T]
        for name in series:
            row = cell.get((name, T))
            ratio = "" if row is None or "time_vs_baseline" not in row else (
                f" ({row['time_vs_baseline']:.2f}x / {row['memory_vs_baseline']:.2f}x)")
            line.append("—" if row is None else f"{common.fmt(row['time_ms'])} / {common.fmt(row['peak_mb'])}{ratio}")
        lines.append(line)
    return common.markdown_table(headers, lines)


def plot(rows: list[dict], budget_mb: float, lengths: Sequence[int], title: str, path: str) -> None:
    """Time (left) and per-rank peak memory (right) against T, log-log, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, label in ((axes[0], "time_ms", "step time (ms), slowest rank"),
                           (axes[1], "peak_mb", "peak extra memory per rank (MB)")):
        for name in dict.fromkeys(_series(r) for r in rows):
            of_series = [r for r in rows if _series(r) == name]
            ax.plot([r["T"] for r in of_series], [r[key] for r in of_series], marker="o", markersize=4,
                    linewidth=1.8, linestyle="--" if name == BASELINE else "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(lengths))
        ax.set_xticklabels([str(t) for t in lengths])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("context length T (whole sequence)")
        ax.set_ylabel(label)
    axes[1].axhline(budget_mb, color="grey", linestyle=":", linewidth=1.5, label=f"budget {budget_mb:g} MB")
    for ax in axes:
        ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict) -> str:
    s, env = data["settings"], data["environment"]
    longest = ", ".join(f"{name}: {'T = ' + str(t) if t else 'none measured'}"
                        for name, t in data["longest_under_budget"].items())
    top = max(s["lengths"])
    at_top = ", ".join(f"{_series(r)} {r['memory_vs_baseline']:.2f}x" for r in data["results"]
                       if r["T"] == top and "memory_vs_baseline" in r)
    below = min((r["world"] for r in data["results"] if r["T"] == top and r["world"] > 1
                 and r.get("memory_vs_baseline", 1) < 1),
                default="none measured")
    lines = [f"# Context parallelism (ring attention): {env['device_name']}", "", *common.environment_lines(env),
             f"- step: causal attention forward + backward, float32, B = {s['batch']}, H = {s['heads']}, "
             f"D = {s['head_dim']}, cpu backend kernels; ring = fastgpt.distributed.ring_attention on zigzag shards "
             f"over N gloo processes on this machine; baseline {BASELINE} on the whole sequence, one process",
             f"- time: {s['timer']}; memory: {s['memory']}",
             f"- torch threads per rank: cores // N (at least 1): the N processes share {env['cpu_cores']} cores",
             f"- not run: NCCL / GPUs, more than one machine", "",
             f"Per-rank peak extra memory against one process's at T = {top}: {at_top}. Beside its shards a rank "
             "holds the K/V arriving for the next step and, in the backward, the dK/dV accumulators and the "
             "block's gradients: about 3x the shard-sized buffers of one fused call on the whole sequence, so it "
             f"falls below one process's only from N = {below} on here. The longest T whose per-rank peak fits "
             f"{s['memory_budget_mb']:g} MB: {longest}.", "",
             "Cells: step time (ms) / peak extra memory per rank (MB); for ring rows, in brackets, both against "
             f"the baseline at the same T (time ratio / memory ratio).", "",
             table(data["results"], s["lengths"]), "",
             f"![context parallelism](./{data['plot']})"]
    return "\n".join(lines)


def _int_list(parser, text: str, name: str) -> list[int]:
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        values = []
    if not values or any(n < 1 for n in values):
        parser.error(f"--{name} takes comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt bench context-parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default=",".join(map(str, WORLD_SIZES)),
                        help="processes per run (default: %(default)s)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="context lengths T, each divisible by 2 x every world size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=BATCH, help="B (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=HEADS, help="H (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="D (default: %(default)s)")
    parser.add_argument("--memory-budget-mb", type=float, default=MEMORY_BUDGET_MB,
                        help="per-rank memory budget of the longest-T summary (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=TIMEOUT_S,
                        help="per world size, after which its processes are killed (default: %(default)s)")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.world_sizes = _int_list(parser, args.world_sizes, "world-sizes")
    args.lengths = _int_list(parser, args.lengths, "lengths")
    for T in args.lengths:
        for world in args.world_sizes:
            if T % (2 * world) != 0:
                parser.error(f"--lengths: {T} is not divisible by 2 x {world} (the zigzag layout's chunks)")
    if min(args.batch, args.heads, args.head_dim, args.repeats) < 1 or args.memory_budget_mb <= 0:
        parser.error("--batch, --heads, --head-dim, --repeats and --memory-budget-mb must be positive")
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, writes its files, returns the JSON data (paths under "files")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device("cpu")
    env = common.environment(device, argv, "fastgpt bench context-parallel")
    stem = (args.stem or env["device_kind"]) + "_context_parallel"
    settings = {"lengths": args.lengths, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                "repeats": args.repeats}
    started = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for world in args.world_sizes:
        print(f"{world} process{'es' * (world > 1)} ...", file=sys.stderr)
        results += measure_world(world, settings, args.out_dir, args.timeout_s)
        os.remove(os.path.join(args.out_dir, f"world{world}.json"))
    add_ratios(results)
    png = os.path.join(args.out_dir, f"{stem}.png")
    data = {
        "benchmark": "context_parallel",
        "environment": env,
        "settings": {**settings, "world_sizes": args.world_sizes, "memory_budget_mb": args.memory_budget_mb,
                     "dtype": "float32", "causal": True, "backend": "cpu", "baseline": BASELINE,
                     "timer": "time.perf_counter from a barrier before the step to one after it, median",
                     "memory": common.MEMORY_MEASURE["cpu"] + "; the maximum over the ranks",
                     "seconds": time.perf_counter() - started},
        "results": results,
        "longest_under_budget": longest_under_budget(results, args.memory_budget_mb),
        "plot": os.path.basename(png),
    }
    plot(results, args.memory_budget_mb, args.lengths,
         f"ring attention training step, causal, B={args.batch} H={args.heads} D={args.head_dim} float32, "
         f"{env['device_name']}", png)
    paths = common.write_outputs(args.out_dir, stem, data, markdown(data))
    data["files"] = {**paths, "png": png}
    common.print_report(table(results, args.lengths), {}, data["files"])
    return data


main = common.main_of(run)


if __name__ == "__main__":
    sys.exit(main())
