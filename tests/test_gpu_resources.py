"""The GPU resource table against what ships, without a GPU: benchmarks/results/gpu_resources.json,
written by `make gpu-resources` (tools/gpu_resources.py compiles every CUDA kernel for sm_80 and
sm_90 and every Triton candidate configuration for sm_90). Reading the committed table keeps this
fast; regenerate it after changing a kernel or a candidate list (the coverage tests below fail when a
kernel or candidate is missing from it).
"""
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_resources  # noqa: E402

TABLE = os.path.join(ROOT, "benchmarks", "results", "gpu_resources.json")
ELEMENTS = ("__half", "__nv_bfloat16", "float")


@pytest.fixture(scope="module")
def table():
    with open(TABLE) as f:
        return json.load(f)


def compiled_widths():
    """The kernel widths attention.h instantiates (FASTGPT_ATTENTION_KERNEL_WIDTHS)."""
    with open(os.path.join(ROOT, "csrc", "cuda", "attention.h")) as f:
        macro = re.search(r"#define FASTGPT_ATTENTION_KERNEL_WIDTHS\(X, Element\)(.*?)\n\n", f.read(), re.S).group(1)
    return [int(w) for w in re.findall(r"X\(Element, (\d+)\)", macro)]


def test_every_cuda_kernel_is_in_the_table(table):
    listed = {(row["arch"], row["kernel"]) for row in table["cuda"]}
    for arch in ("sm_80", "sm_90"):
        for element in ELEMENTS:
            for width in compiled_widths():
                for family in ("attention_fwd_kernel", "attention_bwd_kernel", "attention_decode_kernel"):
                    assert (arch, f"{family}<{element}, {width}>") in listed, (arch, family, element, width)


# The one spill left (gpu_resources.md, Targets): the float32 SIMT backward at D = 128 on sm_90, at the
# 255-register limit. Listed with its bytes so that it cannot grow, nor a new one appear, unnoticed;
# an entry that stops spilling fails too, to be removed.
KNOWN_SPILL_STORES = {("sm_90", "attention_bwd_kernel<float, 128>"): 12}


def test_no_cuda_kernel_spills(table):
    spilling = {(row["arch"], row["kernel"]): row["spill_stores"] for row in table["cuda"]
                if row["spill_stores"] or row["spill_loads"]}
    assert spilling == KNOWN_SPILL_STORES, f"CUDA kernels spilling registers to local memory: {spilling}"


def test_every_cuda_kernel_fits_its_architecture(table):
    for row in table["cuda"]:
        assert row["smem"] <= gpu_resources.ARCHS[row["arch"]]["smem_per_block"], row
        assert row["blocks_per_sm"] >= 1, row


def test_half_precision_forward_runs_two_blocks_per_sm_on_hopper(table):
    # 8 warps a block: two blocks (16 warps) per SM hide the latency of one block's softmax behind
    # the other's tensor-core work (the target for D <= 64).
    for element in ("__half", "__nv_bfloat16"):
        for width in (w for w in compiled_widths() if w <= 64):
            (row,) = [r for r in table["cuda"] if r["arch"] == "sm_90"
                      and r["kernel"] == f"attention_fwd_kernel<{element}, {width}>"]
            assert row["blocks_per_sm"] >= 2 and row["warps_per_sm"] >= 16, row


def test_every_triton_candidate_is_in_the_table(table):
    from fastgpt.triton import attention as fa, attention_decode as ad, layer_norm as ln
    listed = {(row["kernel"], row["config"]["num_warps"], row["config"]["num_stages"],
               row["config"].get("BLOCK_M"), row["config"].get("BLOCK_N"), row["config"].get("BLOCK_R"))
              for row in table["triton"]}
    for kernel, configs_by_width in (("attention_fwd", fa.FWD_CONFIGS), ("attention_bwd_dkdv", fa.DKDV_CONFIGS),
                                     ("attention_bwd_dq", fa.DQ_CONFIGS)):
        for configs in configs_by_width.values():
            for c in configs:
                assert (kernel, c.num_warps, c.num_stages, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], None) in listed
    for configs in ad.DECODE_CONFIGS.values():
        for c in configs:
            assert any(key[:3] == ("attention_decode", c.num_warps, c.num_stages) and key[4] == c.kwargs["BLOCK_N"]
                       for key in listed), c
    for kernel, configs in (("layer_norm_fwd", ln.FWD_CONFIGS), ("layer_norm_bwd", ln.BWD_CONFIGS)):
        for c in configs:
            assert (kernel, c.num_warps, c.num_stages, None, None, c.kwargs["BLOCK_R"]) in listed, (kernel, c)


# Known to exceed sm_90's 227 KB (gpu_resources.md, Targets): the first float32 candidates at head dim 256
# (float32 tiles take twice the bytes of the bfloat16 ones they were sized for). _launch.compiled_spills
# counts them as never launching, so the pruner drops them for float32 calls; listed so that no other appears.
KNOWN_TOO_BIG = {("attention_fwd", "fp32", 256), ("attention_bwd_dq", "fp32", 256)}


def test_no_triton_candidate_exceeds_the_shared_memory_of_an_sm90_block(table):
    too_big = {(row["kernel"], row["variant"], row["BLOCK_D"]) for row in table["triton"]
               if row["smem"] > gpu_resources.ARCHS["sm_90"]["smem_per_block"]}
    assert too_big == KNOWN_TOO_BIG, f"Triton configurations that cannot launch on sm_90: {too_big}"


@pytest.mark.parametrize("arch,threads,registers,smem,blocks,limit", [
    ("sm_90", 256, 127, 48 * 1024, 2, "registers"),   # 128 registers a thread: 16 warps of the 64K registers
    ("sm_90", 256, 128, 48 * 1024, 2, "registers"),
    ("sm_90", 256, 129, 48 * 1024, 1, "registers"),   # rounded to 136: 15 warps, one block of 8
    ("sm_90", 128, 255, 144 * 1024, 1, "shared memory"),  # 2 x (144 + 1) KB > 228 KB
    ("sm_80", 128, 96, 80 * 1024, 2, "shared memory"),   # 164 KB: 2 x 81 KB
    ("sm_90", 128, 96, 80 * 1024, 2, "shared memory"),   # 228 KB: 2 x 81 KB (3 x 81 > 228)
    ("sm_90", 256, 32, 0, 8, "threads"),
    ("sm_80", 128, 64, 164 * 1024, 0, "shared memory"),  # more than a block may have: does not launch
])
def test_occupancy_follows_the_occupancy_calculator(arch, threads, registers, smem, blocks, limit):
    got = gpu_resources.occupancy(arch, threads, registers, smem)
    assert (got["blocks_per_sm"], got["limited_by"]) == (blocks, limit)
    assert got["warps_per_sm"] == blocks * threads // 32
