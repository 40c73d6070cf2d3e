"""CUDA-specific tests of the `cuda` backend (csrc/cuda); the shared correctness tests of
test_attention.py, test_layer_norm.py and test_rms_norm.py already run it through the `kernel` fixture on a GPU.

Without a GPU:
- the build registers the CUDA kernels whenever it could compile them;
- the kernels themselves run on the CPU under csrc/cuda/emulator (every CUDA thread a fiber,
  ldmatrix / mma.sync / cp.async emulated per the PTX ISA) against the float64 oracle, in both
  fiber schedule orders and both cp.async completion modes.
On a GPU (marker `cuda`): op-level errors for unsupported head dims and dtypes, CUDA-graph
capture and replay, launches on the current stream, long sequences against the float64 oracle,
and the dropout mask bit-identical to the reference's and the cpu backend's.
"""
import glob
import math
import os
import shutil

import pytest
import torch

import fastgpt
from fastgpt import backends, reference
from checks import assert_close, attention_oracle, make_qkv, padding_mask

OPS = ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "add_rms_norm_fwd",
       "rms_norm_bwd")
HAS_GPU = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_gpu(test):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")(test))


def has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", "CUDA")


def test_cuda_kernels_are_registered_when_the_build_could_compile_them():
    """setup.py compiles csrc/cuda whenever nvcc and a CUDA torch are present (no GPU needed)."""
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit or a CPU build of torch: the extension is built without CUDA")
    if os.environ.get("FASTGPT_CUDA") == "0":
        pytest.skip("FASTGPT_CUDA=0: the CUDA part was switched off")
    missing = [op for op in OPS if not has_cuda_kernel(op)]
    assert not missing, f"fastgpt._C has no CUDA kernel for {missing}: rebuild (make build)"
    reason = fastgpt.info()["cuda"]["reason"]
    if not HAS_GPU:
        assert "no CUDA device" in reason, reason


# ---- the kernels on the CPU, emulated -------------------------------------------------------

def cuda_include_dir():
    """The CUDA toolkit's include directory (cuda_fp16.h etc.), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"))
    for root in filter(None, candidates):
        if os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


@pytest.fixture(scope="module")
def emulator():
    """csrc/cuda/emulator/emulator.cpp built with torch's JIT loader (cached under build/)."""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h): the emulated kernels cannot be compiled")
    from torch.utils.cpp_extension import load
    build_dir = os.path.join(ROOT, "build", "cuda_emulator")
    os.makedirs(build_dir, exist_ok=True)
    return load(name="fastgpt_cuda_emulator", sources=[os.path.join(ROOT, "csrc", "cuda", "emulator", "emulator.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc"), include], build_directory=build_dir,
                # Strict aliasing on, as an optimising host compiler has it: the kernels copy the bits
                # of their 16-byte vectors (vector_io.cuh), they do not reinterpret them.
                extra_cflags=["-O2", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"])


# (B, H, Tq, Tk, D, causal, masked, dropout_p): every head dim, partial tiles, Tq < Tk and
# Tq > Tk (rows without keys), a padding mask with a fully masked batch, dropout.
EMULATED_ATTENTION = [
    (2, 2, 70, 130, 64, True, True, 0.0),
    (1, 1, 130, 61, 16, True, False, 0.0),
    (2, 1, 45, 45, 32, False, True, 0.2),
    (1, 1, 33, 200, 128, False, False, 0.0),
    (1, 2, 150, 150, 128, True, False, 0.1),
    (2, 1, 1, 77, 32, True, True, 0.0),
]
SCHEDULES = [(False, False), (True, True)]  # (reverse fiber order, cp.async lands at the wait)


@pytest.mark.parametrize("reverse_order,copy_at_wait", SCHEDULES, ids=["forward-order", "reverse-order-late-copies"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", EMULATED_ATTENTION, ids=lambda c: "B{}H{}Tq{}Tk{}D{}-causal{}-mask{}-p{}".format(*c))
def test_emulated_attention_matches_oracle(emulator, case, dtype, reverse_order, copy_at_wait):
    B, H, Tq, Tk, D, causal, masked, dropout_p = case
    q, k, v = make_qkv(B, H, Tq, Tk, D, dtype, transposed=True)  # non-contiguous (B, T, H, D) views
    mask = padding_mask(B, Tk) if masked else None
    scale, seed = D ** -0.5, 1234
    out, lse = emulator.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, 0, 0.0, reverse_order,
                                      copy_at_wait)
    assert_close(out, *attention_oracle(q, k, v, causal, mask, dropout_p, scale, seed), what="out")
    want_lse = reference.attention_lse(q.double(), k.double(), causal, mask, scale)
    no_key = want_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), no_key), "lse: -inf exactly for the rows without a visible key"
    assert_close(lse[~no_key], want_lse[~no_key], what="lse")

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = emulator.attention_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, 0, 0.0,
                                   reverse_order, copy_at_wait)
    want = reference_grads(q, k, v, grad_out, causal, torch.float64, mask, dropout_p, scale, seed)
    same = reference_grads(q, k, v, grad_out, causal, dtype, mask, dropout_p, scale, seed)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want, same):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, s, what=name)


# Grouped-query heads, sliding windows and the logit softcap, emulated:
# (B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap).
EMULATED_MODERN = [
    (2, 4, 2, 70, 130, 64, True, True, 0.0, None, None),    # GQA group 2, Tq < Tk, padding mask
    (1, 3, 1, 45, 45, 32, False, False, 0.2, None, None),   # MQA, dropout keyed by the query head
    (1, 2, 2, 200, 200, 16, True, False, 0.0, 40, None),    # causal window across tiles (skipped tiles)
    (2, 2, 1, 150, 170, 32, False, True, 0.1, 37, None),    # non-causal window, MQA, mask, dropout
    (2, 2, 2, 61, 61, 128, True, False, 0.0, 1, None),      # window 1: each query sees only itself
    (1, 4, 2, 33, 90, 64, False, False, 0.0, None, 5.0),    # softcap, GQA
    (2, 4, 2, 130, 150, 32, True, True, 0.1, 33, 20.0),     # all three, dropout, mask
    (1, 2, 1, 100, 40, 16, True, False, 0.0, 8, 2.0),       # Tq > Tk: rows without keys, window + cap
    # Head dims 80 and 96 run on the 128-wide kernels (zero columns), 256 on its own (split dK, dV).
    (2, 4, 2, 45, 70, 80, True, True, 0.0, None, None),     # GQA, Tq < Tk, padding mask
    (1, 2, 1, 70, 40, 80, True, False, 0.0, 9, 4.0),        # Tq > Tk: rows without keys, window + cap
    (2, 3, 1, 50, 77, 96, False, True, 0.1, 30, 5.0),       # MQA, non-causal window, cap, mask, dropout
    (2, 2, 1, 40, 75, 256, True, True, 0.0, 24, 10.0),      # GQA, Tq < Tk, causal window, cap, mask
    (2, 2, 1, 33, 33, 256, False, False, 0.1, None, None),  # MQA, full attention, dropout
]


@pytest.mark.parametrize("reverse_order,copy_at_wait", SCHEDULES, ids=["forward-order", "reverse-order-late-copies"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", EMULATED_MODERN,
                         ids=lambda c: "B{}Hq{}Hkv{}Tq{}Tk{}D{}-causal{}-mask{}-p{}-w{}-cap{}".format(*c))
def test_emulated_modern_attention_matches_oracle(emulator, case, dtype, reverse_order, copy_at_wait):
    B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap = case
    q, _, _ = make_qkv(B, Hq, Tq, Tk, D, dtype, transposed=True)
    _, k, v = make_qkv(B, Hkv, Tq, Tk, D, dtype, transposed=True, generator_seed=5)
    mask = padding_mask(B, Tk) if masked else None
    scale, seed = D ** -0.5, 77
    if softcap is not None:
        q = (q.float() * 3).to(dtype)  # scores large enough for the cap to bite
    out, lse = emulator.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, window or 0, softcap or 0.0,
                                      reverse_order, copy_at_wait)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_close(out, *attention_oracle(q, k, v, causal, mask, dropout_p, scale, seed, window, softcap), what="out")
    want_lse = reference.attention_lse(q.double(), k.double(), causal, mask, scale, window, softcap)
    no_key = want_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), no_key), "lse: -inf exactly for the rows without a visible key"
    assert not no_key.all(), "the case must have visible keys"
    assert_close(lse[~no_key], want_lse[~no_key], what="lse")

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = emulator.attention_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, window or 0,
                                   softcap or 0.0, reverse_order, copy_at_wait)
    want = reference_grads(q, k, v, grad_out, causal, torch.float64, mask, dropout_p, scale, seed, window, softcap)
    same = reference_grads(q, k, v, grad_out, causal, dtype, mask, dropout_p, scale, seed, window, softcap)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want, same):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, s, what=name)


def test_emulated_dropout_mask_is_bit_identical_to_reference(emulator):
    """v = identity (Tk = D): output row i is P̃[i, :], its zeros are the dropped weights."""
    B, H, T, D, p, seed = 2, 2, 64, 64, 0.3, 2**31 - 1
    q, k, _ = make_qkv(B, H, T, T, D, torch.float32)
    v = torch.eye(T).expand(B, H, T, D).contiguous()
    out, _ = emulator.attention_fwd(q, k, v, None, False, D ** -0.5, p, seed, 0, 0.0, False, False)
    assert torch.equal(out != 0, reference.dropout_keep_mask(seed, B, H, T, T, p))


def test_compiled_head_dims_are_the_declared_ones(emulator):
    """csrc/cuda/attention.h compiles the head dims that fastgpt/backends.py declares for `cuda`."""
    assert tuple(emulator.attention_head_dims()) == backends.REGISTRY["cuda"].head_dims


# ---- the emulator's fragment maps against CuTe's layouts --------------------------------------------
#
# An independent source for the register layouts of mma.m16n8k16 and ldmatrix .x4: CuTe (NVIDIA/cutlass,
# include/cute/atom/mma_traits_sm80.hpp and copy_traits_sm75.hpp) writes each as a layout, a map from a
# (thread, value) coordinate to an index given by a shape and a stride (nested tuples; a coordinate is
# spread over a nested shape colexicographically: the leftmost mode varies fastest). The facts used,
# the shapes and strides there:
#   SM80_16x8x16_F32F16F16F32_TN and _F32BF16BF16F32_TN (the same layouts; value v is half v % 2 of
#   register v // 2; the index is column-major in the operand):
#     A (T32, V8) -> (M16, K16)   ((4, 8), (2, 2, 2)) : ((32, 1), (16, 8, 128))
#     B (T32, V4) -> (N8, K16)    ((4, 8), (2, 2))    : ((16, 1), (8, 64))
#     C (T32, V4) -> (M16, N8)    ((4, 8), (2, 2))    : ((32, 1), (16, 8))      (one float a register)
#   ldmatrix: the source is 32 rows of 128 bits (lane l points to row l: block l // 8, row l % 8); the
#   destination layout maps (thread, (bit, ..., register)) to the source bit:
#     SM75_U32x4_LDSM_N   (32, (32, 4))             : (32, (1, 1024))
#     SM75_U16x8_LDSM_T   ((4, 8), (16, 2, 4))      : ((256, 16), (1, 128, 1024))   (the value modes:
#                                                     bit, 16-bit half, register)
CUTE_MMA = {  # name: (thread shape, thread stride, value shape, value stride, rows of the index, 16-bit)
    "mma_a": ((4, 8), (32, 1), (2, 2, 2), (16, 8, 128), 16, True),
    "mma_b": ((4, 8), (16, 1), (2, 2), (8, 64), 8, True),
    "mma_c": ((4, 8), (32, 1), (2, 2), (16, 8), 16, False),
}
CUTE_LDMATRIX = {  # name: (thread shape, thread stride, value shape, value stride)
    "ldmatrix": (32, 32, (32, 4), (1, 1024)),
    "ldmatrix_trans": ((4, 8), (256, 16), (16, 2, 4), (1, 128, 1024)),
}


def cute_index(shape, stride, coord):
    """CuTe's layout function: the integer coordinate spread over `shape` colexicographically, dotted
    with `stride` (both nested tuples or ints)."""
    if isinstance(shape, int):
        return coord * stride
    index = 0
    for sub_shape, sub_stride in zip(shape, stride):
        size = math.prod(sub_shape) if isinstance(sub_shape, tuple) else sub_shape
        index += cute_index(sub_shape, sub_stride, coord % size)
        coord //= size
    return index


def cute_fragment_maps():
    """The maps of CUTE_MMA and CUTE_LDMATRIX in the emulator's form: name -> {(lane, register[, half]):
    (row, col) of the operand (A row x k, B k x col, C row x col) or (block, row, col) of ldmatrix's
    stored 8 x 8 blocks}."""
    maps = {}
    for name, (t_shape, t_stride, v_shape, v_stride, rows, halves) in CUTE_MMA.items():
        entries = {}
        for lane in range(32):
            for value in range(math.prod(v_shape)):
                index = cute_index(t_shape, t_stride, lane) + cute_index(v_shape, v_stride, value)
                first, second = index % rows, index // rows  # column-major (M, K), (N, K), (M, N)
                element = (second, first) if name == "mma_b" else (first, second)  # B as (k, col)
                entries[(lane, value // 2, value % 2) if halves else (lane, value)] = element
        maps[name] = entries
    for name, (t_shape, t_stride, v_shape, v_stride) in CUTE_LDMATRIX.items():
        entries = {}
        for lane in range(32):
            for reg in range(4):
                for half in range(2):
                    value = 16 * half + 32 * reg  # the half's first bit: (16 h, reg) or (0, h, reg)
                    bit = cute_index(t_shape, t_stride, lane) + cute_index(v_shape, v_stride, value)
                    row, col = bit // 128, bit % 128 // 16  # of the 32 source rows of 8 x 16 bits
                    entries[(lane, reg, half)] = (row // 8, row % 8, col)
        maps[name] = entries
    return maps


def map_mismatches(got, want):
    """The (lane, register[, half]) keys where two maps of one kind disagree (missing ones included)."""
    return sorted(key for key in set(got) | set(want) if got.get(key) != want.get(key))


def emulator_fragment_maps(emulator):
    """emulator.fragment_maps() (rows of key then element) in cute_fragment_maps()'s form."""
    maps = {}
    for name, rows in emulator.fragment_maps().items():
        width = 3 if name.startswith("ldmatrix") else 2  # (block, row, col) or (row, col)
        maps[name] = {tuple(row[:-width]): tuple(row[-width:]) for row in rows}
    return maps


def test_emulator_fragment_maps_are_cutes(emulator):
    """Every (lane, register, half) of the mma A, B, C/D fragments and of ldmatrix .x4 / .x4.trans,
    as the emulator maps it (ptx_emulation.h), against CuTe's layouts."""
    got, want = emulator_fragment_maps(emulator), cute_fragment_maps()
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(want[name]) == {"mma_a": 256, "mma_b": 128, "mma_c": 128}.get(name, 256)
        assert len(set(want[name].values())) == len(want[name]), f"{name}: CuTe's map is one-to-one"
        assert map_mismatches(got[name], want[name]) == [], name


@pytest.mark.parametrize("name", ["mma_a", "mma_b", "mma_c", "ldmatrix", "ldmatrix_trans"])
def test_fragment_map_comparison_finds_a_permuted_map(name):
    """The comparison above on deliberately wrong maps: two entries swapped, and one lane's registers
    rotated, are reported exactly where they differ."""
    want = cute_fragment_maps()[name]
    keys = sorted(want)
    swapped = dict(want)
    swapped[keys[3]], swapped[keys[40]] = want[keys[40]], want[keys[3]]
    assert map_mismatches(swapped, want) == sorted([keys[3], keys[40]])
    lane_keys = [key for key in keys if key[0] == 5]
    rotated = dict(want)
    for key, source in zip(lane_keys, lane_keys[1:] + lane_keys[:1]):
        rotated[key] = want[source]
    assert map_mismatches(rotated, want) == lane_keys


def to_bits(values, dtype):
    """16-bit patterns (int64) of float values in a 16-bit dtype."""
    return values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def pack_fragment(matrix, entries, regs, dtype):
    """(32, regs) int64 registers holding `matrix` as the map `entries` places it."""
    bits = to_bits(matrix, dtype)
    registers = torch.zeros(32, regs, dtype=torch.int64)
    for (lane, reg, half), (row, col) in entries.items():
        registers[lane, reg] |= bits[row, col] << (16 * half)
    return registers


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_emulated_mma_computes_a_times_b_plus_c_on_cutes_fragments(emulator, dtype):
    """The emulated mma.m16n8k16 on fragments placed by CuTe's layouts computes D = A B + C (small
    integers: exact in every dtype and summation order)."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randint(-4, 5, (16, 16), generator=gen).float()
    b = torch.randint(-4, 5, (16, 8), generator=gen).float()
    c = torch.randint(-50, 51, (16, 8), generator=gen).float()
    maps = cute_fragment_maps()
    c_regs = torch.zeros(32, 4)
    for (lane, reg), (row, col) in maps["mma_c"].items():
        c_regs[lane, reg] = c[row, col]
    d_regs = emulator.run_mma(pack_fragment(a, maps["mma_a"], 4, dtype), pack_fragment(b, maps["mma_b"], 2, dtype),
                              c_regs, dtype == torch.bfloat16)
    d = torch.empty(16, 8)
    for (lane, reg), (row, col) in maps["mma_c"].items():
        d[row, col] = d_regs[lane, reg]
    assert torch.equal(d, a @ b + c)


@pytest.mark.parametrize("transpose", (False, True), ids=["x4", "x4.trans"])
def test_emulated_ldmatrix_delivers_cutes_elements(emulator, transpose):
    """Each register half of the emulated ldmatrix holds the stored element CuTe's layout says."""
    stored = 1000 + torch.arange(32 * 8, dtype=torch.int64).view(32, 8)  # distinct 16-bit patterns
    registers = emulator.run_ldmatrix(stored, transpose)
    for (lane, reg, half), (block, row, col) in cute_fragment_maps()["ldmatrix_trans" if transpose else
                                                                     "ldmatrix"].items():
        assert (registers[lane, reg].item() >> (16 * half)) & 0xFFFF == stored[8 * block + row, col].item()


# ---- split-KV decode (csrc/cuda/attention_decode.cuh), emulated ---------------------------------

def test_decode_bound_is_the_declared_one(emulator):
    """attention.h's kDecodeMaxQueries is fastgpt.backends.DECODE_MAX_QUERIES."""
    assert emulator.decode_max_queries() == backends.DECODE_MAX_QUERIES


def visible_key_span(Tq, Tk, causal, window):
    """[first, end) of the keys some query sees (no padding mask): what the decode chunks cover."""
    seen = reference.visible_keys(Tq, Tk, causal, None, "cpu", window)[0, 0].any(dim=0).nonzero()
    return (0, 0) if seen.numel() == 0 else (seen.min().item(), seen.max().item() + 1)


# (B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap, chunk); chunk 0 = the planned split.
EMULATED_DECODE = [
    (2, 2, 2, 1, 77, 16, True, True, 0.0, None, None, 32),     # Tq 1, padding (batch 0 sees nothing), ragged chunks
    (1, 4, 2, 3, 200, 64, True, False, 0.0, None, None, 64),   # GQA 2, Tq 3, Tk not a multiple of the chunk
    (2, 4, 1, 16, 256, 64, True, True, 0.0, None, None, 64),   # MQA: 64 rows = 8 row blocks, chunks divide Tk
    (1, 8, 2, 16, 100, 16, False, False, 0.2, None, None, 0),  # GQA 4, dropout, Tk below one planned chunk
    (2, 4, 4, 5, 300, 32, True, False, 0.1, 50, None, 40),     # causal window (chunks cover it only), dropout
    (2, 4, 2, 7, 150, 64, False, True, 0.0, 30, 5.0, 32),      # non-causal window, softcap, padding
    (1, 2, 1, 16, 10, 16, True, False, 0.0, None, 3.0, 4),     # Tq > Tk: rows without keys, softcap
    (2, 6, 3, 2, 520, 16, True, True, 0.0, None, None, 0),     # the planned split of 520 keys: 2 chunks
    (1, 4, 2, 1, 130, 80, True, False, 0.0, None, None, 48),   # D 80 on the 128-wide kernel
    (1, 2, 1, 4, 90, 256, False, False, 0.1, None, None, 32),  # D 256 (2 vectors a lane in float32), dropout
]
DECODE_BOTH_SCHEDULES = {0, 2, 4, 7}  # cases also run in reverse fiber order with late copies


def decode_params():
    for index, case in enumerate(EMULATED_DECODE):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for schedule in SCHEDULES[:2 if index in DECODE_BOTH_SCHEDULES else 1]:
                yield pytest.param(case, dtype, *schedule, id="B{}Hq{}Hkv{}Tq{}Tk{}D{}-causal{}-mask{}-p{}-w{}-cap{}"
                                   "-chunk{}".format(*case) + f"-{dtype}-{'reverse' if schedule[0] else 'forward'}")


def decode_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, softcap, masked):
    q, _, _ = make_qkv(B, Hq, Tq, Tk, D, dtype, transposed=True)
    _, k, v = make_qkv(B, Hkv, Tq, Tk, D, dtype, transposed=True, generator_seed=5)
    if softcap is not None:
        q = (q.float() * 3).to(dtype)  # scores large enough for the cap to bite
    return q, k, v, (padding_mask(B, Tk) if masked else None)


def check_forward(out, lse, q, k, v, mask, causal, dropout_p, scale, seed, window, softcap):
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close(out, *attention_oracle(q, k, v, causal, mask, dropout_p, scale, seed, window, softcap), what="out")
    want_lse = reference.attention_lse(q.double(), k.double(), causal, mask, scale, window, softcap)
    no_key = want_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), no_key), "lse: -inf exactly for the rows without a visible key"
    assert (out[no_key.unsqueeze(-1).expand_as(out)] == 0).all(), "rows without a visible key are zeros"
    assert not no_key.all(), "the case must have visible keys"
    assert_close(lse[~no_key], want_lse[~no_key], what="lse")


@pytest.mark.parametrize("case,dtype,reverse_order,copy_at_wait", list(decode_params()))
def test_emulated_decode_matches_oracle(emulator, case, dtype, reverse_order, copy_at_wait):
    B, Hq, Hkv, Tq, Tk, D, causal, masked, dropout_p, window, softcap, chunk = case
    q, k, v, mask = decode_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, softcap, masked)
    scale, seed = D ** -0.5, 77
    out, lse, splits = emulator.attention_decode_fwd(q, k, v, mask, causal, scale, dropout_p, seed, window or 0,
                                                     softcap or 0.0, chunk, reverse_order, copy_at_wait)
    first, end = visible_key_span(Tq, Tk, causal, window)
    planned = emulator.attention_decode_plan(B, Hq, Hkv, Tq, Tk, causal, window or 0, 132)
    assert splits == max(1, -(-(end - first) // (chunk or planned[1]))), "chunks cover exactly the visible span"
    if chunk:
        assert splits > 1, "the case must span several chunks"
    check_forward(out, lse, q, k, v, mask, causal, dropout_p, scale, seed, window, softcap)


def test_emulated_forward_takes_the_decode_kernels_up_to_the_bound(emulator):
    """attention_fwd (attention.cu's dispatch) runs the decode kernels, with the planned split, for
    Tq <= DECODE_MAX_QUERIES, and the prefill kernel above."""
    B, Hq, Hkv, Tk, D, dtype = 2, 4, 2, 520, 32, torch.float16
    for Tq in (1, backends.DECODE_MAX_QUERIES, backends.DECODE_MAX_QUERIES + 1):
        q, k, v, mask = decode_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, None, True)
        args = (q, k, v, mask, True, D ** -0.5, 0.0, 0, 0, 0.0)
        out, lse = emulator.attention_fwd(*args, False, False)
        decode_out, decode_lse, splits = emulator.attention_decode_fwd(*args, 0, False, False)
        assert splits == 2, "520 keys: two planned chunks"
        if Tq <= backends.DECODE_MAX_QUERIES:
            assert torch.equal(out, decode_out) and torch.equal(lse, decode_lse)
        check_forward(out, lse, q, k, v, mask, True, 0.0, D ** -0.5, 0, None, None)


@pytest.mark.parametrize("shape", [(1, 32, 8, 1, 32768), (8, 32, 8, 1, 4096), (1, 8, 1, 16, 1000), (64, 32, 8, 4, 300),
                                   (1, 4, 4, 1, 100), (2, 64, 1, 16, 100000), (1, 1, 1, 1, 10**7)],
                         ids=lambda s: "B{}Hq{}Hkv{}Tq{}Tk{}".format(*s))
def test_decode_split_fills_the_gpu_with_chunks_of_a_few_hundred_keys(emulator, shape):
    B, Hq, Hkv, Tq, Tk = shape
    sms = 132
    splits, chunk, row_blocks = emulator.attention_decode_plan(B, Hq, Hkv, Tq, Tk, True, 0, sms)
    assert row_blocks == -(-(Hq // Hkv) * Tq // 8)
    assert 1 <= splits <= 128 and (splits - 1) * chunk < Tk <= splits * chunk, "the chunks cover the keys"
    if splits > 1:
        assert chunk >= 256, "no chunk shorter than a few hundred keys"
    blocks = B * Hkv * row_blocks * splits
    assert blocks >= 4 * sms or splits == 128 or chunk < 2 * 256, "enough blocks to fill the GPU when Tk allows"
    assert B * Hkv * row_blocks * max(splits // 2, 1) < 4 * sms or splits == 1, "no more chunks than needed"


def test_emulated_decode_dropout_mask_is_bit_identical_to_reference(emulator):
    """v = identity (Tk = D): output row i is P̃[i, :], its zeros are the dropped weights."""
    B, H, Tq, Tk, p, seed = 2, 2, 16, 64, 0.3, 2**31 - 1
    q, k, _ = make_qkv(B, H, Tq, Tk, Tk, torch.float32)
    v = torch.eye(Tk).expand(B, H, Tk, Tk).contiguous()
    out, _, splits = emulator.attention_decode_fwd(q, k, v, None, False, Tk ** -0.5, p, seed, 0, 0.0, 16, False, False)
    assert splits == 4
    assert torch.equal(out != 0, reference.dropout_keep_mask(seed, B, H, Tq, Tk, p))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_emulated_backward_through_the_decode_forward(emulator, dtype):
    """The backward kernel runs on the decode forward's out and lse (two planned chunks, GQA, dropout)."""
    B, Hq, Hkv, Tq, Tk, D, causal, dropout_p, scale, seed = 2, 4, 2, 8, 520, 32, True, 0.1, 32 ** -0.5, 11
    q, k, v, mask = decode_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, None, True)
    out, lse = emulator.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed, 0, 0.0, False, False)
    check_forward(out, lse, q, k, v, mask, causal, dropout_p, scale, seed, None, None)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = emulator.attention_bwd(grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, 0, 0.0, False,
                                   False)
    want = reference_grads(q, k, v, grad_out, causal, torch.float64, mask, dropout_p, scale, seed)
    same = reference_grads(q, k, v, grad_out, causal, dtype, mask, dropout_p, scale, seed)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want, same):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, s, what=name)


def test_emulated_decode_grid_limit_is_refused(emulator):
    """(Hq / Hkv) * Tq rows beyond grid.z's 65535 blocks of 8: a clear error, before any kernel runs."""
    q = torch.zeros(1, 32800, 16, 16)
    k = v = torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match=r"fastgpt::attention_fwd: \(Hq / Hkv\) \* Tq must be at most 524280 "
                                           r"for the decode kernel \(grid.z"):
        emulator.attention_fwd(q, k, v, None, True, 0.25, 0.0, 0, 0, 0.0, False, False)


def test_emulated_launch_grid_is_checked_against_cudas_limits(emulator):
    """ptx.cuh's launch_grid, which every launcher builds its dim3 with: past a limit, an error instead
    of a count wrapped in the dim3 (too few blocks) or a failed launch."""
    assert emulator.launch_grid(2**31 - 1, 65535, 65535) == [2**31 - 1, 65535, 65535]
    for grid in ((2**31, 1, 1), (1, 65536, 1), (1, 1, 65536)):
        with pytest.raises(RuntimeError, match=r"fastgpt: the launch grid of a test grid would be \(\d+, \d+, \d+\) "
                                               r"blocks, past CUDA's limits \(x <= 2\^31 - 1, y and z <= 65535\)"):
            emulator.launch_grid(*grid)


def test_emulated_attention_grids_past_65535_tiles_are_refused(emulator):
    """grid.y counts query tiles (forward) or key tiles (backward) of 64 rows in float32: one row past
    65535 tiles is refused before any kernel runs. The long q, k, v are expanded views (no memory)."""
    T = 65535 * 64 + 1
    long = torch.zeros(1, 1, 1, 16).expand(1, 1, T, 16)
    with pytest.raises(RuntimeError, match=r"the launch grid of the attention forward \(B \* H, query tiles\) would be "
                                           r"\(1, 65536, 1\) blocks"):
        emulator.attention_fwd(long, long, long, None, False, 0.25, 0.0, 0, 0, 0.0, False, False)
    q = torch.zeros(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match=r"the launch grid of the attention backward \(B \* Hkv, key tiles of 64\) "
                                           r"would be \(1, 65536, 1\) blocks"):
        emulator.attention_bwd(q, q, long, long, q, torch.zeros(1, 1, 32), None, True, 0.25, 0.0, 0, 0, 0.0, False,
                               False)


@pytest.mark.parametrize("head_dim,smem_bytes", [(64, 48 * 1024), (128, 96 * 1024)])
def test_emulated_shared_memory_opt_in_is_checked(emulator, head_dim, smem_bytes):
    """The bfloat16 forward needs 48 KiB at D = 64 (exactly the default: it opts in too) and 96 KiB at
    D = 128. On a device that grants less, the opt-in's refusal (cudaFuncSetAttribute's return code)
    is the error, not the launch that would fail next."""
    q, k, v = make_qkv(1, 1, 20, 20, head_dim, torch.bfloat16)  # Tq > 16: the prefill kernel, not decode
    previous = emulator.set_shared_memory_limit(40 * 1024)
    try:
        with pytest.raises(RuntimeError, match=rf"fastgpt: the attention forward kernel needs {smem_bytes} bytes of "
                                               r"shared memory per block, which this GPU refused to grant "
                                               r"\(cudaFuncSetAttribute: invalid argument\)"):
            emulator.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0, False, False)
    finally:
        emulator.set_shared_memory_limit(previous)
    out, _ = emulator.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0, False, False)
    assert_close(out, *attention_oracle(q, k, v, True, None, 0.0, 0.125))


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
def test_emulated_backward_takes_a_misaligned_out(emulator, dtype):
    """The delta kernel reads the saved out with 16-byte vector loads: a contiguous out that starts
    one element into its storage is copied to an aligned one first (the emulator fails an unaligned
    vector load, where a GPU would fault), with the same gradients."""
    q, k, v = make_qkv(1, 2, 40, 40, 32, dtype)
    out, lse = emulator.attention_fwd(q, k, v, None, True, 0.2, 0.0, 0, 0, 0.0, False, False)
    misaligned = torch.empty(out.numel() + 1, dtype=dtype)[1:].view(out.shape).copy_(out)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = emulator.attention_bwd(grad_out, q, k, v, out, lse, None, True, 0.2, 0.0, 0, 0, 0.0, False, False)
    got = emulator.attention_bwd(grad_out, q, k, v, misaligned, lse, None, True, 0.2, 0.0, 0, 0, 0.0, False, False)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


def test_emulated_layer_norm_with_no_rows(emulator):
    x = torch.empty(0, 64)
    w, b = torch.ones(64), torch.zeros(64)
    y, mean, rstd = emulator.layer_norm_fwd(x, w, b, 1e-5, False, False)
    assert y.shape == (0, 64) and mean.shape == rstd.shape == (0,)
    grad_x, grad_w, grad_b = emulator.layer_norm_bwd(x, x, w, mean, rstd, 3, False, False)
    assert grad_x.shape == (0, 64) and (grad_w == 0).all() and (grad_b == 0).all()


# (N, C, offset): warp rows, block rows, the generic path (C % 8 != 0), tiny C, a large mean.
EMULATED_LAYER_NORM = [(37, 768, 0.0), (9, 1600, 0.0), (5, 4099, 0.0), (3, 8, 0.0), (40, 1024, 1e3), (6, 1280, 1e3)]


@pytest.mark.parametrize("reverse_order,copy_at_wait", SCHEDULES, ids=["forward-order", "reverse-order-late-copies"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("case", EMULATED_LAYER_NORM, ids=lambda c: "N{}C{}-offset{}".format(*c))
def test_emulated_layer_norm_matches_oracle(emulator, case, dtype, reverse_order, copy_at_wait):
    N, C, offset = case
    if offset and dtype != torch.float32:
        pytest.skip("the large-mean case is about float32 cancellation")
    gen = torch.Generator().manual_seed(N + C)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) + offset).to(dtype)
    weight, bias = (1 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype), \
        (0.5 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype)
    grad_y = torch.randn(N, C, generator=gen, dtype=torch.float64).to(dtype)
    y, mean, rstd = emulator.layer_norm_fwd(x, weight, bias, 1e-5, reverse_order, copy_at_wait)
    got = (y, *emulator.layer_norm_bwd(grad_y, x, weight, mean, rstd, 3, reverse_order, copy_at_wait))
    results = {}
    for precision in (torch.float64, dtype):
        leaves = [t.to(precision).requires_grad_() for t in (x, weight, bias)]
        out = reference.layer_norm(*leaves, 1e-5)
        results[precision] = (out.detach(), *torch.autograd.grad(out, leaves, grad_y.to(precision)))
    same = results[dtype] if dtype != torch.float32 else results[torch.float64]
    for name, g, w, s in zip(("y", "dx", "dweight", "dbias"), got, results[torch.float64], same):
        assert g.dtype == dtype
        assert_close(g, w, s, what=name)
    x64 = x.double()
    assert_close(rstd, (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), what="rstd")


def test_emulated_rms_norm_with_no_rows(emulator):
    x = torch.empty(0, 64)
    for weight in (torch.ones(64), None):
        y, total, rstd = emulator.rms_norm_fwd(x, None, weight, 1e-6, 1.0, False, False)
        assert y.shape == (0, 64) and total is None and rstd.shape == (0,) and rstd.dtype == torch.float32
        y, total, rstd = emulator.rms_norm_fwd(x, x, weight, 1e-6, 1.0, False, False)
        assert y.shape == total.shape == (0, 64) and rstd.shape == (0,)
        grad_x, grad_w = emulator.rms_norm_bwd(x, x, weight, rstd, 1.0, 3, False, False)
        assert grad_x.shape == (0, 64)
        assert grad_w.shape == ((64,) if weight is not None else (0,)) and (grad_w == 0).all()


def test_emulated_rms_norm_refuses_float64(emulator):
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"fastgpt::rms_norm_fwd: dtype must be float16, bfloat16 or float32"):
        emulator.rms_norm_fwd(x, None, None, 1e-6, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"fastgpt::add_rms_norm_fwd: dtype must be float16, bfloat16 or float32"):
        emulator.rms_norm_fwd(x, x, None, 1e-6, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"fastgpt::rms_norm_bwd: dtype must be float16, bfloat16 or float32"):
        emulator.rms_norm_bwd(x, x, None, torch.ones(3), 0.0, 3, False, False)


# (N, C): C = 1 and odd C (the generic path), warp rows (C <= 128 vectors), block rows, C at
# the block rows' limit for 16-bit types (generic for float32), a large odd C.
EMULATED_RMS_NORM = [(7, 1), (40, 256), (3, 8), (37, 1600), (9, 8192), (5, 4099)]
RMS_VARIANTS = [("weight", 0.0), ("weight", 1.0), ("none", 1.0)]  # (weight, offset)


def rms_inputs(N, C, dtype, with_weight, seed=0):
    gen = torch.Generator().manual_seed(N * 7919 + C + seed)
    x = (2 * torch.randn(N, C, generator=gen, dtype=torch.float64)).to(dtype)
    residual = torch.randn(N, C, generator=gen, dtype=torch.float64).to(dtype)
    weight = (0.5 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype) if with_weight else None
    grad_y = torch.randn(N, C, generator=gen, dtype=torch.float64).to(dtype)
    return x, residual, weight, grad_y


def rms_reference(h, weight, grad_y, offset, precision):
    """(y, dh, dweight or None) of reference.rms_norm computed in `precision`."""
    leaves = [h.to(precision).requires_grad_()] + ([weight.to(precision).requires_grad_()] if weight is not None
                                                    else [])
    out = reference.rms_norm(leaves[0], leaves[1] if weight is not None else None, 1e-6, offset)
    grads = torch.autograd.grad(out, leaves, grad_y.to(precision))
    return out.detach(), grads[0], grads[1] if weight is not None else None


@pytest.mark.parametrize("reverse_order,copy_at_wait", SCHEDULES, ids=["forward-order", "reverse-order-late-copies"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("variant", RMS_VARIANTS, ids=lambda v: "{}-offset{}".format(*v))
@pytest.mark.parametrize("add", (False, True), ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("case", EMULATED_RMS_NORM, ids=lambda c: "N{}C{}".format(*c))
def test_emulated_rms_norm_matches_oracle(emulator, case, add, variant, dtype, reverse_order, copy_at_wait):
    (N, C), (with_weight, offset) = case, variant
    x, residual, weight, grad_y = rms_inputs(N, C, dtype, with_weight == "weight")
    y, total, rstd = emulator.rms_norm_fwd(x, residual if add else None, weight, 1e-6, offset, reverse_order,
                                           copy_at_wait)
    if add:  # the sum rounded to x's dtype, exactly as the unfused x + residual
        assert total.dtype == dtype and torch.equal(total, x + residual), "sum"
        h = total
    else:
        assert total is None
        h = x
    grad_x, grad_w = emulator.rms_norm_bwd(grad_y, h, weight, rstd, offset, 3, reverse_order, copy_at_wait)
    want = rms_reference(h, weight, grad_y, offset, torch.float64)
    same = rms_reference(h, weight, grad_y, offset, dtype) if dtype != torch.float32 else want
    assert y.dtype == grad_x.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (N,)
    assert_close(y, want[0], same[0], what="y")
    assert_close(grad_x, want[1], same[1], what="dx")
    if weight is None:
        assert grad_w.shape == (0,) and grad_w.dtype == dtype
    else:
        assert grad_w.shape == (C,) and grad_w.dtype == dtype
        assert_close(grad_w, want[2], same[2], what="dweight")
    h64 = h.double()
    assert_close(rstd, (h64.pow(2).mean(-1) + 1e-6).rsqrt(), what="rstd")


@pytest.mark.parametrize("case", [(40, 256), (37, 1600), (5, 4099)], ids=lambda c: "N{}C{}".format(*c))
def test_emulated_rms_norm_grad_weight_does_not_depend_on_the_schedule(emulator, case):
    """The per-block partial sums are added in a fixed order: both fiber orders give the same bits."""
    N, C = case
    x, _, weight, grad_y = rms_inputs(N, C, torch.bfloat16, True, seed=1)
    _, _, rstd = emulator.rms_norm_fwd(x, None, weight, 1e-6, 1.0, False, False)
    first = emulator.rms_norm_bwd(grad_y, x, weight, rstd, 1.0, 3, False, False)
    second = emulator.rms_norm_bwd(grad_y, x, weight, rstd, 1.0, 3, True, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ---- op-level errors ------------------------------------------------------------------------

UNSUPPORTED_HEAD_DIM = r"head dim must be 16, 32, 64, 80, 96, 128 or 256 \(the compiled CUDA kernels\), got {}"


@pytest.mark.parametrize("head_dim", (8, 48, 112, 512))
def test_emulated_unsupported_head_dim_is_refused_naming_the_supported_ones(emulator, head_dim):
    """The launcher choice (csrc/cuda/host.h) is the op's: a head dim between two kernel widths is
    refused too, not run on the wider kernel."""
    q, k, v = make_qkv(1, 1, 4, 4, head_dim, torch.float32)
    with pytest.raises(RuntimeError, match="fastgpt::attention_fwd: " + UNSUPPORTED_HEAD_DIM.format(head_dim)):
        emulator.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="fastgpt::attention_bwd: " + UNSUPPORTED_HEAD_DIM.format(head_dim)):
        emulator.attention_bwd(q, q, k, v, q, torch.zeros(1, 1, 4), None, True, 0.125, 0.0, 0, 0, 0.0, False, False)


@needs_gpu
@pytest.mark.parametrize("head_dim", (8, 48, 512))
def test_unsupported_head_dim_is_refused_naming_the_supported_ones(head_dim):
    q, k, v = make_qkv(1, 1, 4, 4, head_dim, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="fastgpt::attention_fwd: " + UNSUPPORTED_HEAD_DIM.format(head_dim)):
        torch.ops.fastgpt.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0)


@needs_gpu
def test_unsupported_dtype_is_refused_naming_the_supported_ones():
    q, k, v = make_qkv(1, 1, 4, 4, 64, torch.float64, "cuda")
    with pytest.raises(RuntimeError, match=r"fastgpt::attention_fwd: dtype must be float16, bfloat16 or float32 "
                                           r"\(the CUDA kernels\), got Double"):
        torch.ops.fastgpt.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0)
    x = torch.randn(3, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match=r"fastgpt::layer_norm_fwd: dtype must be float16, bfloat16 or float32"):
        torch.ops.fastgpt.layer_norm_fwd(x, torch.ones(8, dtype=x.dtype, device="cuda"),
                                         torch.zeros(8, dtype=x.dtype, device="cuda"), 1e-5)


@needs_gpu
def test_mismatched_layer_norm_weight_is_refused():
    x = torch.randn(3, 8, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match=r"fastgpt::layer_norm_fwd: weight must have shape \(C,\) = \(8,\), got \[7\]"):
        torch.ops.fastgpt.layer_norm_fwd(x, torch.ones(7, dtype=x.dtype, device="cuda"),
                                         torch.zeros(7, dtype=x.dtype, device="cuda"), 1e-5)


# ---- streams and CUDA graphs ------------------------------------------------------------------

def attention_step(q, k, v, grad_out, mask):
    """Forward and backward ops of one attention call: (out, lse, dq, dk, dv)."""
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, mask, True, 0.125, 0.1, 1234, 0, 0.0)
    grads = torch.ops.fastgpt.attention_bwd(grad_out, q, k, v, out, lse, mask, True, 0.125, 0.1, 1234, 0, 0.0)
    return (out, lse, *grads)


def layer_norm_step(x, weight, bias, grad_y):
    y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, 1e-5)
    return (y, mean, rstd, *torch.ops.fastgpt.layer_norm_bwd(grad_y, x, weight, mean, rstd))


def graph_inputs(dtype):
    q, k, v = make_qkv(2, 3, 100, 130, 64, dtype, "cuda")
    grad_out = torch.randn_like(q)
    x = torch.randn(70, 768, dtype=dtype, device="cuda")
    weight, bias = torch.randn(768, dtype=dtype, device="cuda"), torch.randn(768, dtype=dtype, device="cuda")
    return (q, k, v, grad_out, padding_mask(2, 130, "cuda")), (x, weight, bias, torch.randn_like(x))


def assert_replay_equals_eager(replayed, eager, names):
    for name, got, want in zip(names, replayed, eager):
        if name == "dq":  # float32 atomics across key blocks: the summation order may differ
            tol = 4 * torch.finfo(got.dtype).eps * want.abs().max().item()
            assert (got.float() - want.float()).abs().max().item() <= tol, name
        else:
            assert torch.equal(got, want), f"{name}: graph replay differs from the eager run"


@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_cuda_graph_capture_and_replay_equal_eager(dtype):
    """No host sync, no allocation outside the caching allocator, everything on the capturing
    stream: otherwise capture fails. Replays on new input values must match eager runs."""
    attention_args, layer_norm_args = graph_inputs(dtype)

    def step():
        return attention_step(*attention_args), layer_norm_step(*layer_norm_args)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = step()

    for static in attention_args + layer_norm_args:  # new values (the padding mask stays)
        if static.is_floating_point():
            static.copy_(torch.randn_like(static))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    assert_replay_equals_eager(static_outputs[0], eager[0], ("out", "lse", "dq", "dk", "dv"))
    assert_replay_equals_eager(static_outputs[1], eager[1], ("y", "mean", "rstd", "dx", "dweight", "dbias"))


@needs_gpu
def test_kernels_run_on_the_current_stream():
    """The inputs are written on a side stream behind a long sleep; ops called under
    torch.cuda.stream(side) must wait for them, which they do only if they launch on `side`."""
    q, k, v = make_qkv(1, 2, 256, 256, 64, torch.float16, "cuda")
    x = torch.randn(512, 1024, dtype=torch.float16, device="cuda")
    weight, bias = torch.ones(1024, dtype=x.dtype, device="cuda"), torch.zeros(1024, dtype=x.dtype, device="cuda")
    want_out = torch.ops.fastgpt.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0, 0.0)[0]
    want_y = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, 1e-5)[0]
    q_side, x_side = torch.zeros_like(q), torch.zeros_like(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copies land
        q_side.copy_(q)
        x_side.copy_(x)
        got_out = torch.ops.fastgpt.attention_fwd(q_side, k, v, None, True, 0.125, 0.0, 0, 0, 0.0)[0]
        got_y = torch.ops.fastgpt.layer_norm_fwd(x_side, weight, bias, 1e-5)[0]
    side.synchronize()
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_y, want_y)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_a_non_current_device():
    q, k, v = make_qkv(1, 2, 70, 70, 64, torch.float16, "cuda:1")
    out = fastgpt.attention(q, k, v, backend="cuda")
    assert out.device == q.device
    assert_close(out, *attention_oracle(q, k, v, True))


# ---- long sequences against the float64 oracle ----------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape,causal", [((2, 2, 1024, 1024, 64), True), ((1, 2, 2048, 2048, 128), False),
                                           ((1, 1, 4096, 4096, 128), True), ((1, 2, 1000, 4096, 64), True)],
                         ids=["T1024-D64-causal", "T2048-D128-full", "T4096-D128-causal", "Tq1000-Tk4096-D64"])
def test_long_sequences_forward_and_backward(shape, causal, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, device="cuda", requires_grad=True)
    out = fastgpt.attention(q, k, v, causal=causal, backend="cuda")
    assert_close(out, *attention_oracle(q.detach(), k.detach(), v.detach(), causal))
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = reference_grads(q, k, v, grad_out, causal, torch.float64)
    same = reference_grads(q, k, v, grad_out, causal, dtype)
    for name, g, w, s in zip(("dq", "dk", "dv"), got, want, same):
        assert_close(g, w, s, what=name)


def reference_grads(q, k, v, grad_out, causal, dtype, mask=None, dropout_p=0.0, scale=None, seed=0, window=None,
                    softcap=None):
    """(dq, dk, dv) of the naive reference computed in `dtype` (float64: the oracle)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, causal, mask, dropout_p, scale, seed, window, softcap)
    return torch.autograd.grad(out, leaves, grad_out.to(dtype))


# ---- dropout ---------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("seed", (0, 1234, 2**31 - 1))
def test_dropout_mask_is_bit_identical_to_reference(seed):
    """With v = identity (Tk = D) the output row i is P̃[i, :], so its zeros are exactly the
    dropped weights (P > 0 everywhere without masking); the cpu backend drops the same ones."""
    B, H, T, D, p = 2, 3, 64, 64, 0.3
    q, k, _ = make_qkv(B, H, T, T, D, torch.float32, "cuda")
    v = torch.eye(T, device="cuda").expand(B, H, T, D).contiguous()
    out, _ = torch.ops.fastgpt.attention_fwd(q, k, v, None, False, D ** -0.5, p, seed, 0, 0.0)
    keep = reference.dropout_keep_mask(seed, B, H, T, T, p, "cuda")
    assert torch.equal(out != 0, keep)
    cpu_out, _ = torch.ops.fastgpt.attention_fwd(q.cpu(), k.cpu(), v.cpu(), None, False, D ** -0.5, p, seed, 0, 0.0)
    assert torch.equal(cpu_out != 0, keep.cpu())
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), False, None, p, D ** -0.5, seed))


@needs_gpu
@pytest.mark.parametrize("causal", (True, False), ids=["causal", "full"])
def test_dropout_forward_and_backward_match_the_oracle(causal):
    q, k, v = make_qkv(2, 2, 77, 93, 32, torch.float32, "cuda")
    mask = padding_mask(2, 93, "cuda", fully_masked_row=False)
    grad_out = torch.randn_like(q)
    args = (mask, causal, 0.2, 0.35, 99, 0, 0.0)
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, *args)
    grads = torch.ops.fastgpt.attention_bwd(grad_out, q, k, v, out, lse, *args)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle_out = reference.attention(*leaves, causal, mask, 0.35, 0.2, 99)
    oracle_grads = torch.autograd.grad(oracle_out, leaves, grad_out.double())
    assert_close(out, oracle_out.detach(), what="out")
    assert_close(lse, reference.attention_lse(q.double(), k.double(), causal, mask, 0.2).float(), what="lse")
    for name, g, w in zip(("dq", "dk", "dv"), grads, oracle_grads):
        assert_close(g, w, what=name)
