"""What every shipped GPU kernel of fastgpt takes from the chip, found without a GPU: registers,
spill stores and loads, shared memory, and the occupancy they allow on an A100 (sm_80) and an
H100 / H200 (sm_90). `make gpu-resources` runs it and writes benchmarks/results/gpu_resources.md
and .json; tests/test_gpu_resources.py reads the .json (no shipped CUDA kernel spills, no Triton
configuration the launchers can pick needs more shared memory than an sm_90 block may have).

CUDA (csrc/cuda): every .cu with kernels is compiled to a cubin per architecture with the
extension's nvcc flags (setup.py, plus the half-precision defines torch adds) and `ptxas -v`, which
reports registers, spill stores / loads, stack and static shared memory per kernel. A kernel's
block size and dynamic shared memory come from its own config struct (FwdConfig, BwdConfig,
DecodeConfig, ...), printed by a small host program compiled from the same headers.

Triton (fastgpt/triton): every candidate configuration the launchers and their autotuners can pick
(each kernel's candidate lists, through the same pruning), at the widest tile each runs with (the
128-wide attention candidates also serve head dims 16 .. 96 in narrower tiles, with fewer registers),
compiled for sm_90 by Triton's own compiler and specialised as a real launch is: data
pointers and strides divisible by 16 (`tt.divisibility`, which Triton's launcher derives from
16-byte-aligned tensors and strides; it enables vectorised loads and the pipelined copies), unit
strides constant 1. Registers and spills come from `ptxas -v` on Triton's PTX with Triton's own ptxas
options, shared memory from its metadata. Attention variants: `gpt` (causal, no mask / dropout,
bfloat16: a GPT's call) for every candidate; `all` (key padding mask, dropout, window and softcap:
the most registers) and `fp32` (float32 inputs: the IEEE dot products) for the first candidate of
each list.

Occupancy (CUDA's occupancy calculator's rules): blocks per SM = the least of
  registers  65536 per SM, allocated per warp in units of 256 (a thread's count rounded up to 8);
  shared    228 KB per SM on sm_90, 164 KB on sm_80, each block also taking 1 KB the driver
            reserves; a block may have at most 227 KB (sm_90) / 163 KB (sm_80);
  threads   2048 per SM;  blocks  32 per SM.

Usage: python tools/gpu_resources.py [--only cuda|triton] [--jobs N] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "make gpu-resources"

# The chips, per architecture: what bounds occupancy (the header's rules).
ARCHS = {
    "sm_80": dict(gpu="A100", registers=65536, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_90": dict(gpu="H100 / H200", registers=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
RESERVED_SMEM_PER_BLOCK = 1024
MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 2048, 32
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256

# setup.py's nvcc flags and the defines torch's build adds to every .cu.
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]


def occupancy(arch: str, threads: int, registers: int, smem: int) -> dict:
    """Blocks and warps per SM of a kernel on `arch`, and what limits them (the header's rules)."""
    chip = ARCHS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(math.ceil(registers / 8) * 8 * 32 / REGISTER_UNIT) * REGISTER_UNIT
    per_block_smem = smem + RESERVED_SMEM_PER_BLOCK
    limits = {  # in the order a tie is reported: the hardware's own bounds before the kernel's
        "threads": MAX_THREADS_PER_SM // threads,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": (chip["registers"] // per_warp) // warps,
        "shared memory": chip["smem_per_sm"] // per_block_smem if smem <= chip["smem_per_block"] else 0,
    }
    blocks = min(limits.values())
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps,
                limited_by=next(name for name, value in limits.items() if value == blocks))


# ---------------------------------------------------------------------------------------------- ptxas

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """mangled kernel name -> registers, spill stores / loads, stack, static shared memory (bytes)."""
    kernels, current = {}, None
    for line in log.splitlines():
        if (entry := PTXAS_ENTRY.search(line)) is not None:
            current = kernels.setdefault(entry.group(1), dict(stack=0, spill_stores=0, spill_loads=0, static_smem=0))
        elif current is not None and (frame := PTXAS_FRAME.search(line)) is not None:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        elif current is not None and (used := PTXAS_USED.search(line)) is not None:
            current.update(registers=int(used.group(1)), static_smem=int(used.group(2) or 0))
    return kernels


def demangle(names: list[str]) -> list[str]:
    """C++ names as `kernel<args>` without namespaces and parameter lists."""
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [re.sub(r"^void |fastgpt::cuda::|\(.*\)$", "", line) for line in out.splitlines()]


# ---------------------------------------------------------------------------------------------- CUDA

# The block size and dynamic shared memory of every kernel family, from the kernels' own constants.
KERNEL_SHAPES_PROGRAM = r"""
#include <cstdio>
#include "cuda/attention_bwd.cuh"
#include "cuda/attention_decode.cuh"
#include "cuda/attention_fwd.cuh"
#include "cuda/layer_norm.cuh"
#include "cuda/rms_norm.cuh"
using namespace fastgpt::cuda;
#define SHAPE(kernel, Cfg, Element, W) \
  std::printf(#kernel "<%s, %d> %d %zu\n", #Element, W, Cfg<Element, W>::kThreads, size_t(Cfg<Element, W>::kSmemBytes));
#define SHAPES(Element, W) SHAPE(attention_fwd_kernel, FwdConfig, Element, W) \
  SHAPE(attention_bwd_kernel, BwdConfig, Element, W) SHAPE(attention_decode_kernel, DecodeConfig, Element, W)
int main() {
  FASTGPT_ATTENTION_KERNEL_WIDTHS(SHAPES, __half)
  FASTGPT_ATTENTION_KERNEL_WIDTHS(SHAPES, __nv_bfloat16)
  FASTGPT_ATTENTION_KERNEL_WIDTHS(SHAPES, float)
  std::printf("layer_norm %d 0\nrms_norm %d 0\nattention_decode_merge_kernel %d 0\n", kLayerNormThreads, kNormThreads,
              kDecodeMergeThreads);
}
"""
FIXED_BLOCKS = {"attention_bwd_delta_kernel": 256, "attention_bwd_convert_dq_kernel": 256}  # attention_bwd.cuh


def nvcc() -> str:
    found = shutil.which("nvcc")
    if found is None:
        raise SystemExit("gpu_resources: nvcc not found (the CUDA toolkit is needed, not a GPU)")
    return found


def include_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths
    return [f"-I{path}" for path in [os.path.join(ROOT, "csrc"), *include_paths("cuda"),
                                     sysconfig.get_paths()["include"]]]


def kernel_shapes(tmp: str) -> dict[str, tuple[int, int]]:
    """`kernel<Element, W>` (or a family's stem) -> (threads per block, dynamic shared memory bytes)."""
    source, program = os.path.join(tmp, "shapes.cu"), os.path.join(tmp, "shapes")
    with open(source, "w") as f:
        f.write(KERNEL_SHAPES_PROGRAM)
    subprocess.run([nvcc(), *NVCC_FLAGS, f"-I{os.path.join(ROOT, 'csrc')}", source, "-o", program], check=True,
                   capture_output=True, text=True)
    lines = subprocess.run([program], check=True, capture_output=True, text=True).stdout.splitlines()
    return {name: (int(threads), int(smem)) for name, threads, smem in (line.rsplit(" ", 2) for line in lines)}


def block_shape(kernel: str, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    stem = kernel.split("<", 1)[0]
    if kernel in shapes:
        return shapes[kernel]
    if stem in FIXED_BLOCKS:
        return FIXED_BLOCKS[stem], 0
    for family in ("attention_decode_merge_kernel", "layer_norm", "rms_norm"):
        if stem.startswith(family):
            return shapes[family]
    raise KeyError(f"gpu_resources: no block shape known for {kernel}")


def compile_cuda(source: str, arch: str, tmp: str) -> tuple[str, str, str, float]:
    """(source, arch, ptxas log, seconds) of `source` compiled to a cubin for `arch`."""
    cubin = os.path.join(tmp, f"{os.path.basename(source)}.{arch}.cubin")
    number = arch.split("_")[1]
    begin = time.monotonic()
    result = subprocess.run([nvcc(), "-cubin", f"-gencode=arch=compute_{number},code={arch}", *NVCC_FLAGS,
                             *include_flags(), "-Xptxas", "-v", source, "-o", cubin],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"gpu_resources: nvcc failed on {source} for {arch}:\n{result.stderr[-4000:]}")
    return source, arch, result.stderr, time.monotonic() - begin


def cuda_resources(jobs: int) -> tuple[list[dict], dict[str, float]]:
    """(one row per kernel and architecture, seconds each .cu took to compile per architecture). A
    kernel instantiated in several files (the norms': host.h's launchers are inline) is one row
    naming every file."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = kernel_shapes(tmp)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            builds = [pool.submit(compile_cuda, s, arch, tmp) for s in sources for arch in ARCHS]
            for build in builds:
                source, arch, log, took = build.result()
                source = os.path.relpath(source, ROOT)
                seconds[f"{source} {arch}"] = round(took, 1)
                kernels = parse_ptxas(log)
                for name, usage in zip(demangle(list(kernels)), kernels.values()):
                    if (arch, name) in rows:
                        rows[arch, name]["sources"].append(source)
                        continue
                    threads, dynamic = block_shape(name, shapes)
                    smem = usage["static_smem"] + dynamic
                    rows[arch, name] = dict(kernel=name, arch=arch, sources=[source], threads=threads,
                                            dynamic_smem=dynamic, smem=smem, **usage,
                                            **occupancy(arch, threads, usage["registers"], smem))
    return sorted(rows.values(), key=lambda r: (r["arch"], r["kernel"])), seconds


# ---------------------------------------------------------------------------------------------- Triton

# Specialisation of a real launch (the header): int arguments equal to 1 become constants (the unit
# strides), pointers and the other strides are multiples of 16 -- except the key padding mask's
# batch stride (Tk, which may be anything).
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_dod", "stride_od", "stride_kpmn", "stride_xc",
                "stride_dyc", "stride_rc", "stride_w", "stride_b")
UNALIGNED_INTS = ("stride_kpmb",)
FLOATS = ("qk_scale", "sm_scale", "dropout_p", "keep_scale", "eps", "softcap", "offset")
FLOAT32_POINTERS = ("lse_ptr", "delta_ptr", "mean_ptr", "rstd_ptr", "dw_partial_ptr", "db_partial_ptr",
                    "part_out_ptr", "part_lse_ptr")
TRITON_SM90 = 90


def triton_source(fn, dtype: str, constexprs: dict):
    """Triton's ASTSource for `fn` (a @triton.jit function) with data pointers of `dtype` ("bf16",
    "fp16", "fp32"), specialised as the header says."""
    from triton.compiler import ASTSource
    constexprs = {**constexprs, **{name: 1 for name in UNIT_STRIDES if name in fn.arg_names}}
    signature = {name: "constexpr" if name in constexprs else
                 ("*fp32" if name in FLOAT32_POINTERS else "*u8" if name == "kpm_ptr" else "*" + dtype)
                 if name.endswith("_ptr") else "fp32" if name in FLOATS else "i32" for name in fn.arg_names}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind != "constexpr" and name not in UNALIGNED_INTS
               and (name.endswith("_ptr") or name.startswith("stride_"))}
    return ASTSource(fn, signature, constexprs, aligned)


def compile_triton(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compiles for sm_90 (no GPU needed) -> registers, spill stores / loads, stack, shared memory."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    printed = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
        knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v: print its report
        compiled = triton.compile(triton_source(fn, dtype, constexprs), target=GPUTarget("cuda", TRITON_SM90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    log = printed.getvalue()
    if not PTXAS_ENTRY.search(log):  # from Triton's cache: no ptxas ran; run it as Triton does
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                 capture_output=True, text=True, check=True).stderr
    (usage,) = parse_ptxas(log).values()
    return dict(**usage, smem=compiled.metadata.shared, threads=32 * num_warps)


def triton_builds() -> list[dict]:
    """Every candidate configuration of every Triton kernel, at the widest tile it runs with (the most
    registers and shared memory: the 128-wide candidates also serve head dims 16 .. 96 in narrower tiles),
    in bfloat16 with a GPT's flags; and the attention candidates the autotuners try first with every
    feature on (mask, dropout, window, softcap) and with float32 inputs."""
    from fastgpt.triton import attention as fa, attention_decode as ad, layer_norm as ln
    builds = []

    def add(kernel, fn, variant, dtype, constexprs, config=None, num_warps=4, num_stages=3):
        meta = {**constexprs, **(config.kwargs if config else {})}
        builds.append(dict(kernel=kernel, variant=variant, dtype=dtype, fn=fn, constexprs=meta,
                           num_warps=config.num_warps if config else num_warps,
                           num_stages=config.num_stages if config else num_stages))

    def head_dim(width):
        return dict(HEAD_DIM=width, BLOCK_D=width)

    plain = dict(CAUSAL=True, HAS_KPM=False, kpm_ptr=None, HAS_DROPOUT=False, SOFTCAP=False, WINDOW=False,
                 DOT_PRECISION="tf32")
    every_feature = dict(CAUSAL=True, HAS_KPM=True, HAS_DROPOUT=True, SOFTCAP=True, WINDOW=True, DOT_PRECISION="tf32")
    float32 = {**plain, "DOT_PRECISION": "ieee"}
    attention = (("attention_fwd", fa._attention_fwd_kernel, fa.FWD_CONFIGS, {}),
                 ("attention_bwd_dkdv", fa._attention_bwd_dkdv_kernel, fa.DKDV_CONFIGS, dict(DQ_PASS=False)),
                 ("attention_bwd_dq", fa._attention_bwd_dq_kernel, fa.DQ_CONFIGS, dict(DQ_PASS=True)))
    for name, kernel, configs_by_width, pass_ in attention:
        for width, configs in configs_by_width.items():
            for config in configs:
                add(name, kernel.fn, "gpt", "bf16", {**plain, **pass_, **head_dim(width)}, config)
            add(name, kernel.fn, "all", "bf16", {**every_feature, **pass_, **head_dim(width)}, configs[0])
            add(name, kernel.fn, "fp32", "fp32", {**float32, **pass_, **head_dim(width)}, configs[0])
    add("attention_bwd_delta", fa._attention_bwd_delta_kernel, "gpt", "bf16",
        dict(**head_dim(256), BLOCK_M=fa.DELTA_BLOCK_M))
    # Decode: every candidate beside the largest q tile the host plans and the pruner lets it run with.
    for width, configs in ad.DECODE_CONFIGS.items():
        for config in configs:
            wide_keys = config.kwargs["BLOCK_N"] > 64
            block_m = min(ad.MAX_ROWS_PER_TILE[width], ad.WIDE_KEY_TILE_MAX_ELEMENTS // width) if wide_keys \
                else ad.MAX_ROWS_PER_TILE[width]
            add("attention_decode", ad._attention_decode_kernel.fn, "gpt", "bf16",
                {**plain, "SPLIT": True, **head_dim(width), "BLOCK_M": block_m}, config)
    add("attention_decode_merge", ad._attention_decode_merge_kernel, "gpt", "fp32",
        dict(**head_dim(256), BLOCK_M=ad.MERGE_BLOCK_M), num_stages=1)
    # Norms (RMSNorm's kernels take the same candidates with less work a row): the candidates
    # _prune_to_width keeps at a GPT's width, and at the widest rows.
    for block_c in (1024, 8192, ln.MAX_C):
        for config in ln._prune_to_width(ln.FWD_CONFIGS, {}, BLOCK_C=block_c):
            add("layer_norm_fwd", ln._layer_norm_fwd_kernel.fn, f"C={block_c}", "bf16", dict(BLOCK_C=block_c), config)
        for config in ln._prune_to_width(ln.BWD_CONFIGS, {}, BLOCK_C=block_c):
            add("layer_norm_bwd", ln._layer_norm_bwd_kernel.fn, f"C={block_c}", "bf16", dict(BLOCK_C=block_c), config)
    add("layer_norm_sum_groups", ln._sum_groups_kernel, "fixed", "bf16",
        dict(BLOCK_G=ln.SUM_BLOCK_G, BLOCK_C=ln.SUM_BLOCK_C), num_stages=1)
    return builds


TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_C", "BLOCK_G")


def run_triton_build(index: int) -> dict:
    """The resources of triton_builds()[index] on sm_90."""
    build = triton_builds()[index]
    usage = compile_triton(build["fn"], build["dtype"], build["constexprs"], build["num_warps"], build["num_stages"])
    tiles = {name: build["constexprs"][name] for name in TILE_NAMES if name in build["constexprs"]}
    row = dict(kernel=build["kernel"], variant=build["variant"], dtype=build["dtype"],
               BLOCK_D=build["constexprs"].get("BLOCK_D"), config=dict(**tiles, num_warps=build["num_warps"],
                                                                        num_stages=build["num_stages"]),
               **usage, **occupancy("sm_90", usage["threads"], usage["registers"], usage["smem"]))
    row["fits_sm90"] = usage["smem"] <= ARCHS["sm_90"]["smem_per_block"]
    return row




# ---------------------------------------------------------------------------------------------- report

def toolchain() -> dict:
    import torch
    import triton
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(nvcc=version, triton=triton.__version__, torch=torch.__version__)


def config_text(row: dict) -> str:
    c = row["config"]
    tiles = ", ".join(f"{k[6:]}={v}" for k, v in c.items() if k.startswith("BLOCK_"))
    return f"{tiles}, {c['num_warps']} warps, {c['num_stages']} stages"


def markdown(report: dict) -> str:
    lines = [f"# GPU resources of fastgpt's kernels (no GPU needed)", "",
             f"Produced by `{COMMAND}` (tools/gpu_resources.py; its header says how). Toolchain: "
             f"{report['toolchain']['nvcc']}; Triton {report['toolchain']['triton']}; torch "
             f"{report['toolchain']['torch']}.", "",
             "Occupancy: resident blocks (warps) per SM and what limits them: registers (65536 per SM), shared "
             "memory (228 KB per SM on sm_90, 164 KB on sm_80, plus 1 KB reserved per block), threads (2048).", ""]
    lines += report["summary"] + [""]
    if report["cuda"]:
        lines += ["## CUDA kernels (csrc/cuda)", "",
                  "| arch | kernel | threads | registers | spill stores / loads (B) | stack (B) | shared (B) | "
                  "blocks (warps) / SM | limited by |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["cuda"]:
            lines.append(f"| {r['arch']} | `{r['kernel']}` | {r['threads']} | {r['registers']} | "
                         f"{r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['smem']} | "
                         f"{r['blocks_per_sm']} ({r['warps_per_sm']}) | {r['limited_by']} |")
        lines.append("")
    if report["triton"]:
        lines += ["## Triton kernels (fastgpt/triton), sm_90", "",
                  "| kernel | variant | dtype | BLOCK_D | config | registers | spill stores / loads (B) | shared (B) "
                  "| blocks (warps) / SM | limited by |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["triton"]:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['BLOCK_D'] or ''} | {config_text(r)} | "
                         f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['smem']}"
                         f"{'' if r['fits_sm90'] else ' (too big)'} | {r['blocks_per_sm']} ({r['warps_per_sm']}) | "
                         f"{r['limited_by']} |")
        lines.append("")
    return "\n".join(lines)


# Why the float32 attention backward stays at one block per SM at D >= 128 (the issue asks for two or a reason).
FP32_BACKWARD_REASON = (
    "the float32 backward is the SIMT path (exact float32 FMAs, no tensor cores): at D = 128 and 256 its "
    "K and V tiles of 64 keys and its double-buffered Q and dO tiles take 136-145 KB of shared memory, so "
    "one block of 4 warps fits an SM. Two would need tiles of half the keys, which re-read Q and dO twice as "
    "often; float32 training is not the GPU's fast path (bfloat16 is), so the tiles stay.")


def summary(cuda: list[dict], triton_rows: list[dict]) -> list[str]:
    """The headline numbers and the issue's targets, met or by how much they are missed."""
    lines = ["## Targets", ""]
    if cuda:
        spilling = [f"`{r['kernel']}` ({r['arch']}: {r['spill_stores']} B stores)" for r in cuda if r["spill_stores"]]
        lines.append(f"- No CUDA kernel spills ({len(cuda)} kernels over sm_80 and sm_90): "
                     + ("met." if not spilling else "missed: " + ", ".join(spilling) + "."))
        forward = [r for r in cuda if r["arch"] == "sm_90" and re.fullmatch(
            r"attention_fwd_kernel<(__half|__nv_bfloat16), (16|32|64)>", r["kernel"])]
        short = [r for r in forward if r["blocks_per_sm"] < 2]
        lines.append("- CUDA forward, float16 / bfloat16, D <= 64, at least 2 blocks (16 warps) per SM on sm_90: "
                     + ("met (" + ", ".join(sorted({f"{r['registers']} registers" for r in forward})) + ")."
                        if not short else "missed: " + ", ".join(f"`{r['kernel']}` {r['blocks_per_sm']}" for r in short)))
        fp32 = [r for r in cuda if r["arch"] == "sm_90" and r["kernel"].startswith("attention_bwd_kernel<float,")]
        one = [r for r in fp32 if r["blocks_per_sm"] < 2]
        lines.append("- CUDA float32 backward at 2 blocks per SM on sm_90: "
                     + ("met." if not one else "missed at " + ", ".join(
                         f"`{r['kernel']}` ({r['blocks_per_sm']} block, {r['smem']} B shared)" for r in one)
                        + ": " + FP32_BACKWARD_REASON))
        lines.append("")
        lines.append("Attention kernels on sm_90 (registers, shared memory, resident blocks):")
        lines.append("")
        for r in cuda:
            if r["arch"] == "sm_90" and r["kernel"].startswith(("attention_fwd_kernel", "attention_bwd_kernel<")):
                lines.append(f"- `{r['kernel']}`: {r['registers']} registers, {r['smem']} B shared, "
                             f"{r['blocks_per_sm']} block(s) = {r['warps_per_sm']} warps per SM ({r['limited_by']})")
        lines.append("")
    if triton_rows:
        spilling = [r for r in triton_rows if r["spill_stores"]]
        too_big = [r for r in triton_rows if not r["fits_sm90"]]
        lines.append(f"- Triton ({len(triton_rows)} builds for sm_90): no candidate beyond 227 KB of shared memory: "
                     + ("met." if not too_big else f"missed by {len(too_big)}."))
        groups = {}
        for r in triton_rows:
            groups.setdefault((r["kernel"], r["variant"], r["dtype"], r["BLOCK_D"]), []).append(r)
        stuck = [key for key, rows in groups.items() if all(r["spill_stores"] for r in rows)]
        lines.append(f"- Triton candidates that spill are pruned before benchmarking (fastgpt/triton/_launch.py: "
                     f"spill_free_pruner, from the compiled kernel's spill count): {len(spilling)} of "
                     f"{len(triton_rows)} builds spill. Where every candidate of a call spills, the one spilling "
                     f"least runs: " + (", ".join(f"{k} {v} {d} BLOCK_D={w}" for k, v, d, w in stuck) or "nowhere")
                     + ".")
        for r in spilling:
            lines.append(f"  - {r['kernel']} {r['variant']} {r['dtype']} BLOCK_D={r['BLOCK_D']} ({config_text(r)}): "
                         f"{r['spill_stores']} B spill stores at {r['registers']} registers")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("cuda", "triton"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.only != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_resources: unset TRITON_INTERPRET (Triton must compile the kernels, not interpret them)")
    # The Triton builds (worker processes: Triton's compiler holds the GIL) and the nvcc runs side by side.
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        triton_rows = pool.map(run_triton_build, range(len(triton_builds()))) if args.only != "cuda" else []
        cuda, compile_seconds = cuda_resources(args.jobs) if args.only != "triton" else ([], {})
        triton_rows = list(triton_rows)
    report = dict(command=COMMAND, toolchain=toolchain(), archs=ARCHS, cuda=cuda, cuda_compile_seconds=compile_seconds,
                  triton=triton_rows)
    report["summary"] = summary(cuda, triton_rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_resources.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_resources.md"), "w") as f:
        f.write(markdown(report))
    print("\n".join(report["summary"]))


if __name__ == "__main__":
    main()
