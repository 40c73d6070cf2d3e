"""Split-KV ("flash-decoding") attention forward of the `triton` backend, for calls with few queries.

Why a second forward: decoding against a KV cache asks for Tq <= DECODE_MAX_QUERIES (fastgpt/backends.py)
queries per head against Tk cached keys. The prefill kernel (attention.py) gives each (query tile,
query head) one program that walks all Tk keys: with Tq = 1 that is B * H programs, each running a
long serial loop, a few dozen programs on a GPU with 132 SMs, and every query head of a GQA group
reading the same kv head from memory again. Two changes fix both (Dao et al., "Flash-Decoding", 2023):

- Pack the GQA group. One program owns one kv head (b, hk) and takes all KV_GROUP query heads that read
  it as the rows of one query tile: rows = KV_GROUP * Tq, row r <-> (query head hk * KV_GROUP + r // Tq,
  query i = r % Tq). The kv head's keys are loaded once for the whole group, and the tile's M side
  (at least 16, the tensor cores' minimum) is filled by real rows instead of padding. Since
  h = hk * KV_GROUP + g, the packed rows of a kv head are also consecutive rows of the contiguous
  (B, H, Tq) outputs: row (b * Hkv + hk) * rows + r. Groups larger than MAX_ROWS_PER_TILE rows (64, or
  16 at head dim 256) are cut into several row tiles (the third grid axis): past that the float32
  accumulator and the q tile of 4 warps outgrow the registers.
- Split the keys. The keys a row tile can see (the causal / window bounds of its queries,
  `_decode_key_range`) are cut into chunks of CHUNK keys on an absolute grid (chunk c holds keys
  [c * CHUNK, (c + 1) * CHUNK); CHUNK is a power of two and a multiple of every BLOCK_N, so no key tile
  straddles two chunks), one program per (chunk, kv head, row tile). Each program runs the prefill
  kernel's own online softmax (attention._attention_fwd_rows: unmasked tiles first, then the masked
  ones) over its chunk and writes a partial: its output normalised by its own denominator, o_s = acc_s / l_s
  (dropout's keep scale already applied), and lse_s = m_s + log2 l_s (log2 units), float32. A second,
  small kernel merges the splits exactly: with M = max_s lse_s and weights w_s = exp2(lse_s - M),
  out = Σ_s w_s o_s / Σ_s w_s and lse = M + log2 Σ_s w_s, the same softmax as one pass over all keys
  (the denominators l_s count dropped weights too, as in the prefill kernel). A chunk in which no key
  is visible (empty, all masked, or outside the window) has lse_s = -inf and weight 0; M = -inf (no
  visible key at all) subtracts 0 instead, so no -inf - -inf, and the row gets out = 0, lse = -inf.
  The saved lse is the prefill kernel's, so the backward pass (attention.py) is unchanged.

How many splits (`decode_plan`): enough programs to fill the GPU, PROGRAMS_PER_SM per SM over
B * Hkv * row tiles, but chunks of at least MIN_CHUNK keys (a few BLOCK_N tiles, or the split's fixed
cost and the merge's traffic outweigh the parallelism); CHUNK is the next power of two of
span / splits, so it changes rarely as a KV cache grows (it is part of the autotuning key). With one
split (short caches, or enough kv heads to fill the GPU) the kernel writes out and lse itself and
no merge runs. With a sliding window only the span min(Tk, Tq + W - 1) of keys is visible, plus one
chunk for a span that straddles the grid.

Masking, dropout, softcap, key padding are the prefill kernel's, per row by its query index i: the
row's Philox stream is keyed by its own query head (seed, b * H + h), counter i * Tk + j, so the
dropout mask equals the prefill kernel's and the reference's. Rows past KV_GROUP * Tq (padding of
the last row tile) load q = 0 and are never stored.

Offsets: the per-row q offsets (query head, query) and every row of the outputs and of the
(num_splits, B * H * Tq, D) workspace are int64 before they multiply a stride (`_advance`).

Autotuning: keyed on (BLOCK_M, CHUNK, HEAD_DIM, SPLIT) plus the dtypes; BLOCK_M and the split are
chosen by the host, the GPU candidates are (BLOCK_N, num_warps, num_stages) per padded head dim,
pruned to BLOCK_N <= CHUNK, and to BLOCK_N = 64 beside q tiles of more than 16 x 128 elements
(BLOCK_M * BLOCK_D): compiled for sm_90, 128-key tiles next to a 64 x 128 tile, or a third stage of
them, hit ptxas's 255 registers and spill; the kept ones do not (tests/test_triton.py compiles them;
only with dropout, whose Philox rounds need registers of their own, does a 64-row tile spill a little):
  BLOCK_D <= 128   (64, 4, 2) (64, 4, 3) (128, 4, 2)
  BLOCK_D = 256    (64, 4, 2) (64, 4, 3)
Under TRITON_INTERPRET=1 one config, BLOCK_N = 16, and MIN_CHUNK = 32, so that test caches of a few
dozen keys already span several splits.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import config
from .attention import LN2, _advance, _attention_fwd_rows, _head_dim_tiles, _philox_key

DECODE_CONFIGS = {
    128: [config(4, 2, BLOCK_N=64), config(4, 3, BLOCK_N=64), config(4, 2, BLOCK_N=128)],
    256: [config(4, 2, BLOCK_N=64), config(4, 3, BLOCK_N=64)],
}
WIDE_KEY_TILE_MAX_ELEMENTS = 16 * 128  # BLOCK_N = 128 only for q tiles of at most BLOCK_M * BLOCK_D this many
INTERPRETER_CONFIG = config(1, 1, BLOCK_N=16)
# A chunk must hold whole key tiles of every candidate: CHUNK is a power of two >= the largest BLOCK_N.
MAX_BLOCK_N = INTERPRETER_CONFIG.kwargs["BLOCK_N"] if _launch.INTERPRET else \
    max(c.kwargs["BLOCK_N"] for configs in DECODE_CONFIGS.values() for c in configs)
MIN_CHUNK = 32 if _launch.INTERPRET else 256  # the fewest keys one split walks
# Packed (query head, query) rows per program, by padded head dim; larger groups take several row tiles.
MAX_ROWS_PER_TILE = {128: 64, 256: 16}
PROGRAMS_PER_SM = 2  # the programs a launch aims at per SM
ASSUMED_SMS = 132  # an H100 / H200: the SM count assumed off a GPU (the interpreter), so plans stay the same
MERGE_BLOCK_M = 16  # rows per program of the merge kernel
TUNING_KEY = ["BLOCK_M", "CHUNK", "HEAD_DIM", "SPLIT"]


def _prune(configs, named_args, **kwargs):
    """The call's head dim's candidates with BLOCK_N <= CHUNK, and 128-key tiles only beside small q
    tiles (WIDE_KEY_TILE_MAX_ELEMENTS; the header says why); the smallest tile if none fits."""
    args = {**named_args, **kwargs}
    wanted = _head_dim_tiles(DECODE_CONFIGS, args["HEAD_DIM"])
    for_head_dim = [c for c in configs if any(c is w for w in wanted)]
    small_q = args["BLOCK_M"] * args["BLOCK_D"] <= WIDE_KEY_TILE_MAX_ELEMENTS
    fitting = [c for c in for_head_dim if c.kwargs["BLOCK_N"] <= args["CHUNK"] and (c.kwargs["BLOCK_N"] <= 64 or small_q)]
    return fitting or [min(for_head_dim, key=lambda c: c.kwargs["BLOCK_N"])]


@triton.jit
def _decode_key_range(i_lo, i_hi, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The keys that queries [i_lo, i_hi] see: [lo, end) reaches every visible key of each of them, lo
    BLOCK_N-aligned; [lo, full_end) is visible to all of them (no masking; empty with a window)."""
    shift = Tk - Tq  # query i sits at position p = i + Tk - Tq
    if WINDOW:
        lo = (tl.maximum(i_lo + shift - window + 1, 0) // BLOCK_N) * BLOCK_N
        if CAUSAL:
            end = tl.minimum(tl.maximum(i_hi + 1 + shift, 0), Tk)
        else:
            end = tl.minimum(tl.maximum(i_hi + shift + window, 0), Tk)
        full_end = lo
    elif CAUSAL:
        lo = 0
        full_end = (tl.maximum(i_lo + shift + 1, 0) // BLOCK_N) * BLOCK_N
        end = tl.minimum(tl.maximum(i_hi + 1 + shift, 0), Tk)
    else:
        lo = 0
        full_end = (Tk // BLOCK_N) * BLOCK_N
        end = Tk
    return lo, full_end, end


@_launch.autotune(DECODE_CONFIGS[128] + DECODE_CONFIGS[256], INTERPRETER_CONFIG, key=TUNING_KEY, prune=_prune)
@triton.jit
def _attention_decode_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_kpmb, stride_kpmn,
        H, KV_GROUP, Tq, Tk, qk_scale, dropout_p, keep_scale, seed, softcap, window, CHUNK,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q (B, H, Tq, D), k, v (B, H // KV_GROUP, Tk, D) any strides; kpm uint8 (B, Tk) or None.
    # Grid (num_splits, B * Hkv, cdiv(KV_GROUP * Tq, BLOCK_M)); rows r of the tile: (query head
    # hk * KV_GROUP + r // Tq, query r % Tq).
    #   SPLIT False (one split): out (B, H, Tq, D) in q's dtype and lse (B, H, Tq) float32 natural log,
    #                            contiguous, written here; part_out_ptr, part_lse_ptr unused.
    #   SPLIT True:  this program's chunk (split) -> part_out (num_splits, B * H * Tq, D) float32
    #                (normalised), part_lse (num_splits, B * H * Tq) float32 log2 units (-inf: no key).
    split = tl.program_id(0)
    bhk = tl.program_id(1)  # b * Hkv + kv head
    Hkv = H // KV_GROUP
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    rows = KV_GROUP * Tq
    start_r = tl.program_id(2) * BLOCK_M
    tile_r = tl.arange(0, BLOCK_M)
    offs_r = start_r + tile_r
    row_ok = offs_r < rows
    offs_m = offs_r % Tq  # (BLOCK_M,) the rows' query indices: what masking and dropout go by
    h = hk * KV_GROUP + (offs_r // Tq)  # (BLOCK_M,) int64 the rows' query heads
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) columns, the first HEAD_DIM of them real
    d_ok = offs_d < HEAD_DIM
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_row = kpm_ptr + b * stride_kpmb if HAS_KPM else kpm_ptr
    seed64 = _philox_key(seed, b * H + h)[:, None]  # (BLOCK_M, 1): each row's own query head's stream

    q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64) * stride_qm  # (BLOCK_M,) int64 offsets
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    # The tile's queries: [i_lo, i_hi] (all of them once the tile wraps into the next query head).
    last_r = tl.minimum(start_r + BLOCK_M, rows) - 1
    wraps = last_r // Tq > start_r // Tq
    i_lo = tl.where(wraps, 0, start_r % Tq)
    i_hi = tl.where(wraps, Tq - 1, last_r % Tq)
    lo, full_end, end = _decode_key_range(i_lo, i_hi, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_N)
    if SPLIT:  # this program's chunk of the absolute grid, counted from the one holding lo
        chunk_lo = (lo // CHUNK + split) * CHUNK
        lo = tl.maximum(lo, chunk_lo)
        end = tl.minimum(end, chunk_lo + CHUNK)
    full_end = tl.minimum(tl.maximum(full_end, lo), end)  # an empty range stays empty

    o, lse2 = _attention_fwd_rows(q, k_base, v_base, kpm_row, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                  offs_m, offs_d, d_ok, lo, full_end, end, Tq, Tk, qk_scale, dropout_p, keep_scale,
                                  seed64, softcap, CAUSAL, HAS_KPM, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
                                  BLOCK_D, SOFTCAP, window, WINDOW)  # lse2 in log2 units
    row0 = bhk.to(tl.int64) * rows + start_r  # the tile's first row in the (B * H * Tq) rows of the outputs
    in_tile = tile_r[:, None] * HEAD_DIM + offs_d[None, :]
    ok = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part_row0 = split.to(tl.int64) * tl.num_programs(1) * rows + row0  # (split, row) of the workspace
        tl.store(_advance(part_out_ptr, part_row0, HEAD_DIM) + in_tile, o, mask=ok)
        tl.store(part_lse_ptr + part_row0 + tile_r, lse2, mask=row_ok)
    else:
        tl.store(_advance(out_ptr, row0, HEAD_DIM) + in_tile, o.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(lse_ptr + row0 + tile_r, lse2 * LN2, mask=row_ok)


@triton.jit
def _attention_decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, R, num_splits,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # part_out (num_splits, R, D) float32 normalised partials, part_lse (num_splits, R) float32 log2
    # units, R = B * H * Tq -> out (R, D) = (B, H, Tq, D) contiguous in its dtype, lse (R,) float32
    # natural log. Grid (cdiv(R, BLOCK_M),).
    start = tl.program_id(0) * BLOCK_M
    tile = tl.arange(0, BLOCK_M)
    row_ok = start + tile < R
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    in_tile = tile[:, None] * HEAD_DIM + offs_d[None, :]
    # Pass 1: M = the largest partial lse of each row.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        part_row0 = tl.cast(s, tl.int64) * R + start
        m = tl.maximum(m, tl.load(part_lse_ptr + part_row0 + tile, mask=row_ok, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # no visible key in any split: every weight exp2(-inf) = 0
    # Pass 2: the partials weighted by w_s = exp2(lse_s - M) <= 1.
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        part_row0 = tl.cast(s, tl.int64) * R + start
        w = tl.math.exp2(tl.load(part_lse_ptr + part_row0 + tile, mask=row_ok, other=float("-inf")) - m_sub)
        o = tl.load(_advance(part_out_ptr, part_row0, HEAD_DIM) + in_tile, mask=ok, other=0.0)
        l_sum += w
        acc += w[:, None] * o
    has_key = l_sum > 0.0  # >= 1: the split holding the maximum has weight 1
    l_safe = tl.where(has_key, l_sum, 1.0)
    tl.store(_advance(out_ptr, start, HEAD_DIM) + in_tile, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=ok)
    tl.store(lse_ptr + start + tile, tl.where(has_key, (m + tl.math.log2(l_safe)) * LN2, float("-inf")), mask=row_ok)


# ----------------------------------------------------------------------------- host side

def _program_slots(device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else ASSUMED_SMS
    return PROGRAMS_PER_SM * sms


def decode_plan(B, Hkv, KV_GROUP, Tq, Tk, head_dim, window, device, chunk=None):
    """(BLOCK_M, row tiles, num_splits, CHUNK) of a decode launch. `chunk` forces the chunk size (a power
    of two, a multiple of MAX_BLOCK_N: tests use it to get many splits of few keys); by default the
    splits fill the GPU (see the header). With one split CHUNK is the length bucket of the span (the
    autotuning key's only use of it then)."""
    rows = KV_GROUP * Tq
    block_m = max(16, min(triton.next_power_of_2(rows), _head_dim_tiles(MAX_ROWS_PER_TILE, head_dim)))
    row_tiles = triton.cdiv(rows, block_m)
    windowed = bool(window) and Tq + window - 1 < Tk
    span = Tq + window - 1 if windowed else Tk  # the keys any query of the call can see
    if chunk is None:
        splits = min(triton.cdiv(_program_slots(device), B * Hkv * row_tiles), triton.cdiv(span, MIN_CHUNK))
        chunk = triton.next_power_of_2(triton.cdiv(span, max(splits, 1))) if splits > 1 else None
    else:
        if chunk < MAX_BLOCK_N or chunk & (chunk - 1) or chunk % MAX_BLOCK_N:
            raise ValueError(f"chunk must be a power of two and a multiple of {MAX_BLOCK_N}, got {chunk}")
    num_splits = 1
    if chunk is not None:
        # A windowed span may straddle one more chunk of the absolute grid; never more chunks than Tk has.
        num_splits = min(triton.cdiv(span, chunk) + int(windowed), triton.cdiv(Tk, chunk))
    if num_splits <= 1:
        return block_m, row_tiles, 1, _launch.length_bucket(span)
    return block_m, row_tiles, num_splits, chunk


def attention_decode_fwd(pointers, strides, scalars, out, lse, chunk=None):
    """The split-KV forward of fastgpt::triton_attention_fwd for Tq <= DECODE_MAX_QUERIES, on the
    arguments attention._launch_args checked and built: pointers (q (B, H, Tq, D), k, v (B, Hkv, Tk, D),
    kpm uint8 (B, Tk) or None), their strides and the shared scalars. Writes out (B, H, Tq, D) and lse
    (B, H, Tq) float32, both contiguous; returns the number of splits."""
    q, k = pointers[0], pointers[1]
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    block_m, row_tiles, num_splits, chunk = decode_plan(B, Hkv, H // Hkv, Tq, Tk, D, scalars["window"],
                                                        q.device, chunk)
    args = {name: value for name, value in scalars.items() if name not in ("Q_BUCKET", "K_BUCKET")}
    split = num_splits > 1
    R = B * H * Tq
    if split:
        part_out = torch.empty((num_splits, R, D), dtype=torch.float32, device=q.device)  # (S, B * H * Tq, D)
        part_lse = torch.empty((num_splits, R), dtype=torch.float32, device=q.device)  # (S, B * H * Tq)
    else:
        part_out, part_lse = lse, lse  # unused
    _attention_decode_kernel[(num_splits, B * Hkv, row_tiles)](
        *pointers, out, lse, part_out, part_lse, *strides, CHUNK=chunk, SPLIT=split, BLOCK_M=block_m, **args)
    if split:
        _attention_decode_merge_kernel[(triton.cdiv(R, MERGE_BLOCK_M),)](
            part_out, part_lse, out, lse, R, num_splits, HEAD_DIM=D, BLOCK_D=scalars["BLOCK_D"],
            BLOCK_M=MERGE_BLOCK_M)
    return num_splits
