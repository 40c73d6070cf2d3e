"""FlashAttention-2 in Triton: the fused attention forward and backward of the `triton` backend.

Algorithm (Dao, "FlashAttention-2", 2023), per (batch, head):
- forward: one program per tile of BLOCK_M queries; it streams key/value tiles of
  BLOCK_N keys through on-chip memory and keeps the online-softmax state per row:
  m (running max of the scores, in log2 units), l (running sum of exp2(s - m)) and
  acc (running sum of exp2(s - m) · v). Invariant after each key tile: acc / l is the
  softmax-weighted mean of the values seen so far. The program writes out = acc / l
  and the log-sum-exp lse = ln Σ exp(scale · q·k) (natural-log units, as the schema of
  csrc/ops.cpp says) that the backward pass recomputes the probabilities from.
- backward: a pre-pass computes delta_i = Σ_d dO[i, d] · O[i, d] (= Σ_j P̃_ij dP̃_ij, also
  under dropout); then one kernel owns a key tile and accumulates dK, dV over the
  query tiles that see it, and another owns a query tile and accumulates dQ over its
  key tiles (one kernel, _attention_bwd_kernel, with a DQ_PASS switch: the two passes share
  their arguments and prologue). No atomics, no (Tq, Tk) matrix in memory.

Masking is split so that most tiles skip it: the key tiles that every row of a query
tile sees entirely (below the causal diagonal, inside Tk) run without any masking;
only the tiles that straddle the diagonal or the end of the keys are masked
(`_key_tile_ranges`, `_query_tile_ranges`). Causal is bottom-right aligned: query i
sees key j iff j <= i + (Tk - Tq); for Tq > Tk the first rows see nothing. A row with
no visible key (causal or key_padding_mask) gets out = 0, lse = -inf, and zero
gradients: the online softmax subtracts 0 instead of a -inf maximum, and the backward
pass masks (tl.where) every probability of such a row to 0 before using it.

Today's models (constexpr flags: with them off the kernels are the plain MHA ones):
- GQA / MQA: k, v have Hkv = H // KV_GROUP heads; query head h reads kv head h // KV_GROUP.
  The dK/dV program of (key tile, b, kv head) loops over the group's query heads and sums in
  registers (deterministic, no atomics); dropout stays keyed by the query head b·H + h.
- WINDOW (W > 0, p = i + Tk - Tq): causal sees p - W < j <= p, non-causal |j - p| < W. Only the
  tiles that reach the window are visited (`_window_key_range`, `_window_query_range`), all masked.
- SOFTCAP (c > 0): the natural score s becomes c·tanh(s / c) before masking; the backward
  multiplies dS by 1 - tanh².

Scores are kept in log2 units: s2 = (q·k) · scale · log2(e), so every exponential is
one exp2 (FlashAttention's trick); lse is converted to natural logs when stored.

Dropout keeps P[b, h, i, j] iff tl.rand(seed | (b·H + h) << 32, i·Tk + j) >= dropout_p
(Philox-4x32-10 keyed by (seed, b·H + h), 32-bit counter i·Tk + j: csrc/philox.h and
fastgpt.reference.dropout_keep_mask draw the same bits) and scales kept weights by
1 / (1 - dropout_p). The backward kernels regenerate the mask; nothing is stored.

Head dims (declared with the `triton` backend in fastgpt/backends.py): tl.arange and tl.dot need
power-of-two tile sides of at least 16, so the head dim D runs in a BLOCK_D = next_power_of_2(D)
wide tile (80 and 96 in 128) and every load and store of a (.., D) tensor is masked to the first D
columns: the zero-filled columns add nothing to q·k, and give output / gradient columns that are
zero and never stored.

Offsets: a tile's first row is widened to int64 before it multiplies a stride (`_advance`), since
T · stride passes 2^31 on long sequences (T · H · D of a (B, T, H, D) view, or B · H · T · D of
the contiguous outputs); the offsets inside a tile (at most MAX_TILE_ROWS = 128 rows, BLOCK_D
columns) stay int32, as int64 offsets per element would double their registers. The host copies
the rare view whose in-tile offsets could pass 2^31 (a row or column stride above 2^31 / 128
elements; the key padding mask's absolute key index, Tk · its stride) to a contiguous tensor
first (`_launch.int32_tile_offsets`); tests/test_triton.py runs views past 2^31 in the interpreter.

Autotuning (see fastgpt/triton/_launch.py): every kernel is keyed on
(length bucket of Tq, length bucket of Tk, head dim, causal) plus the dtypes, which
Triton adds itself. GPU candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim,
pruned to tiles no larger than the bucketed lengths (so decoding with Tq = 1 uses BLOCK_M 16).
With BLOCK_D = 256 the q, k, v tiles and the float32 accumulators (acc, dK and dV, dQ: one row of
256 per tile row) are twice as wide: smaller tiles, 8 warps for the big ones and 2 pipeline stages
keep the registers and the shared memory in bounds (sm_90 allows 227 KB; these need at most 96 KB
forward, 129 KB dK/dV, 160 KB dQ; tests/test_triton.py compiles every one of them for sm_90).
  BLOCK_D <= 128
  forward         (128, 64, 4, 3) (128, 64, 8, 3) (128, 128, 8, 3) (64, 64, 4, 3) (16, 64, 4, 3)
  backward dK/dV  (32, 128, 4, 3) (32, 128, 8, 2) (64, 128, 8, 3) (32, 64, 4, 3) (16, 64, 4, 2)
  backward dQ     (128, 32, 4, 3) (128, 64, 8, 3) (64, 64, 4, 3) (64, 32, 4, 2) (16, 64, 4, 2)
  BLOCK_D = 256
  forward         (128, 64, 8, 2) (128, 32, 8, 2) (64, 64, 4, 2) (64, 32, 4, 3) (16, 64, 4, 2)
  backward dK/dV  (32, 64, 8, 2) (64, 64, 8, 2) (32, 32, 4, 2) (16, 64, 4, 2) (16, 32, 4, 2)
  backward dQ     (128, 32, 8, 2) (64, 64, 8, 2) (64, 32, 4, 2) (32, 32, 4, 2) (16, 32, 4, 2)
Under TRITON_INTERPRET=1 (CPU tests) one config each: forward and dQ (32, 16), dK/dV (16, 32).

Float32 matmuls run in IEEE precision, not TF32, to stay within float32 tolerances. Inputs may
have any strides; outputs are contiguous.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _registration, backends
from . import _launch
from ._launch import config

LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
LN2: tl.constexpr = tl.constexpr(math.log(2.0))
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which holds B * H

TUNING_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL"]


def _head_dim_tiles(configs_by_head_dim, head_dim):
    """The candidates for head_dim: those of the smallest padded head dim that holds it."""
    return configs_by_head_dim[min(d for d in configs_by_head_dim if head_dim <= d)]


def _pruner(configs_by_head_dim):
    """early_config_prune over configs_by_head_dim (padded head dim -> candidates): keep the call's
    head dim's candidates with tiles no larger than the bucketed sequence lengths (the smallest
    tile if none fits)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = _head_dim_tiles(configs_by_head_dim, args["HEAD_DIM"])
        # By identity: a config may appear in two head dims' lists (equal Configs compare equal).
        for_head_dim = [c for c in configs if any(c is w for w in wanted)]
        fitting = [c for c in for_head_dim
                   if c.kwargs["BLOCK_M"] <= args["Q_BUCKET"] and c.kwargs["BLOCK_N"] <= args["K_BUCKET"]]
        return fitting or [min(for_head_dim, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _autotune(configs_by_head_dim, interpreter_config):
    """_launch.autotune over the candidates of every head dim, pruned per call to the call's own."""
    every = [c for configs in configs_by_head_dim.values() for c in configs]
    return _launch.autotune(every, interpreter_config, key=TUNING_KEY, prune=_pruner(configs_by_head_dim))


# Candidates per padded head dim (BLOCK_D); the header lists them and says why 256 has its own.
FWD_CONFIGS = {
    128: [config(4, 3, BLOCK_M=128, BLOCK_N=64), config(8, 3, BLOCK_M=128, BLOCK_N=64),
          config(8, 3, BLOCK_M=128, BLOCK_N=128), config(4, 3, BLOCK_M=64, BLOCK_N=64),
          config(4, 3, BLOCK_M=16, BLOCK_N=64)],
    256: [config(8, 2, BLOCK_M=128, BLOCK_N=64), config(8, 2, BLOCK_M=128, BLOCK_N=32),
          config(4, 2, BLOCK_M=64, BLOCK_N=64), config(4, 3, BLOCK_M=64, BLOCK_N=32),
          config(4, 2, BLOCK_M=16, BLOCK_N=64)],
}
DKDV_CONFIGS = {
    128: [config(4, 3, BLOCK_M=32, BLOCK_N=128), config(8, 2, BLOCK_M=32, BLOCK_N=128),
          config(8, 3, BLOCK_M=64, BLOCK_N=128), config(4, 3, BLOCK_M=32, BLOCK_N=64),
          config(4, 2, BLOCK_M=16, BLOCK_N=64)],
    256: [config(8, 2, BLOCK_M=32, BLOCK_N=64), config(8, 2, BLOCK_M=64, BLOCK_N=64),
          config(4, 2, BLOCK_M=32, BLOCK_N=32), config(4, 2, BLOCK_M=16, BLOCK_N=64),
          config(4, 2, BLOCK_M=16, BLOCK_N=32)],
}
DQ_CONFIGS = {
    128: [config(4, 3, BLOCK_M=128, BLOCK_N=32), config(8, 3, BLOCK_M=128, BLOCK_N=64),
          config(4, 3, BLOCK_M=64, BLOCK_N=64), config(4, 2, BLOCK_M=64, BLOCK_N=32),
          config(4, 2, BLOCK_M=16, BLOCK_N=64)],
    256: [config(8, 2, BLOCK_M=128, BLOCK_N=32), config(8, 2, BLOCK_M=64, BLOCK_N=64),
          config(4, 2, BLOCK_M=64, BLOCK_N=32), config(4, 2, BLOCK_M=32, BLOCK_N=32),
          config(4, 2, BLOCK_M=16, BLOCK_N=32)],
}
FWD_INTERPRETER_CONFIG = config(1, 1, BLOCK_M=32, BLOCK_N=16)
DKDV_INTERPRETER_CONFIG = config(1, 1, BLOCK_M=16, BLOCK_N=32)
DQ_INTERPRETER_CONFIG = config(1, 1, BLOCK_M=32, BLOCK_N=16)
DELTA_BLOCK_M = 32 if _launch.INTERPRET else 128
# The most rows (queries or keys) a tile of any kernel here or in attention_decode.py holds.
MAX_TILE_ROWS = max(DELTA_BLOCK_M, *(c.kwargs[name] for configs in (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS)
                                     for tiles in configs.values() for c in tiles for name in ("BLOCK_M", "BLOCK_N")))


# ----------------------------------------------------------------------------- tile helpers

@triton.jit
def _key_tile_ranges(start_m, Tq, Tk, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """For the query tile [start_m, start_m + BLOCK_M), the keys it visits: [lo, full_end) are
    visible to all of its rows (no masking), [full_end, end) need the causal / window / bounds
    mask. With a window only the tiles it reaches are visited, all masked (lo = full_end)."""
    if WINDOW:
        lo, end = _window_key_range(start_m, Tq, Tk, window, CAUSAL, BLOCK_M, BLOCK_N)
        full_end = lo
    elif CAUSAL:
        # Row start_m, the tile's first, sees keys j <= start_m + Tk - Tq (all < Tk): whole key
        # tiles up to there are unmasked. The tile's last row sees up to start_m + BLOCK_M - 1 + Tk - Tq.
        lo = 0
        full_end = (tl.maximum(start_m + Tk - Tq + 1, 0) // BLOCK_N) * BLOCK_N
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + Tk - Tq, 0), Tk)
    else:
        lo = 0
        full_end = (Tk // BLOCK_N) * BLOCK_N
        end = Tk
    return lo, full_end, end


@triton.jit
def _query_tile_ranges(start_n, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the key tile [start_n, start_n + BLOCK_N): queries [lo, full_start) see part of it
    (causal mask needed); queries [full_start, Tq) see all of it. Both are BLOCK_M-aligned."""
    if CAUSAL:
        # Query i sees key j iff i >= j - (Tk - Tq).
        lo = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_start = 0
    return lo, full_start


@triton.jit
def _window_key_range(start_m, Tq, Tk, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sliding window W: the key tiles [lo, end) that the query tile [start_m, start_m + BLOCK_M)
    can see (p = i + Tk - Tq; causal p - W < j <= p, else |j - p| < W); lo is BLOCK_N-aligned.
    Every tile in it is masked; the tiles outside are never visited (cost O(Tq * W))."""
    lo = (tl.maximum(start_m + Tk - Tq - window + 1, 0) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + Tk - Tq, 0), Tk)
    else:
        end = tl.minimum(tl.maximum(start_m + BLOCK_M - 1 + Tk - Tq + window, 0), Tk)
    return lo, end


@triton.jit
def _window_query_range(start_n, Tq, Tk, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sliding window W: the query tiles [lo, hi) that see part of the key tile
    [start_n, start_n + BLOCK_N); lo is BLOCK_M-aligned, every tile is masked."""
    if CAUSAL:
        first = start_n - (Tk - Tq)  # query i sees key j only if j <= i + Tk - Tq
    else:
        first = start_n - (Tk - Tq) - window + 1
    lo = (tl.maximum(first, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 + window - (Tk - Tq), 0), Tq)
    return lo, hi


@triton.jit
def _tile_visible(rows, cols, Tq, Tk, CAUSAL: tl.constexpr):
    """bool, broadcast of rows (query indices) against cols (key indices): key in range and,
    when causal, j <= i + (Tk - Tq)."""
    visible = (cols < Tk) & (rows >= 0)  # `rows >= 0` (always true) gives the full broadcast shape
    if CAUSAL:
        visible = visible & (cols <= rows + (Tk - Tq))
    return visible


@triton.jit
def _tanh(x):
    """tanh via one exp2, saturating cleanly at +-1 for large |x|."""
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _in_window(rows, cols, Tq, Tk, window, CAUSAL: tl.constexpr):
    """bool, rows against cols: key j inside query i's window (p = i + Tk - Tq): j > p - W, and
    j < p + W unless causal (whose j <= p is _tile_visible's)."""
    pos = rows + (Tk - Tq)
    ok = cols > pos - window
    if not CAUSAL:
        ok = ok & (cols < pos + window)
    return ok


@triton.jit
def _key_kept(kpm_row, stride_kpmn, offs_n, Tk):
    """bool (BLOCK_N,): the key padding mask of this batch row at keys offs_n (False past Tk)."""
    return tl.load(kpm_row + offs_n * stride_kpmn, mask=offs_n < Tk, other=0) != 0


@triton.jit
def _dropout_keep(seed64, rows, cols, Tk, dropout_p):
    """bool, broadcast of rows against cols: Philox keeps P[i, j] iff rand(seed64, i·Tk + j) >= p,
    the counter wrapping at 2^32 as in csrc/philox.h."""
    element = rows.to(tl.uint32) * tl.cast(Tk, tl.uint32) + cols.to(tl.uint32)
    return tl.rand(seed64, element) >= dropout_p


@triton.jit
def _philox_key(seed, bh):
    """The 64-bit tl.rand seed: low word the user seed, high word the head index b·H + h."""
    return tl.cast(seed, tl.uint64) | (tl.cast(bh, tl.uint64) << 32)


@triton.jit
def _advance(base, start, stride):
    """base + start * stride with the product in int64: the first row of a tile (see the header)."""
    return base + tl.cast(start, tl.int64) * stride


@triton.jit
def _load_lse2(lse_row, offs_m, Tq):
    """(BLOCK_M,) saved lse in log2 units; rows past Tq read +inf (probabilities exp2(s - inf) = 0).
    A row with no visible key has lse = -inf and exp2(s - lse) = +inf, but all of its entries
    are masked tiles' entries, which tl.where replaces by 0 before any arithmetic."""
    return tl.load(lse_row + offs_m, mask=offs_m < Tq, other=float("inf")) * LOG2E


# ----------------------------------------------------------------------------- forward

@triton.jit
def _attention_fwd_tiles(acc, m_i, l_i, q, k_base, v_base, kpm_row,
                         stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                         offs_m, offs_d, d_ok, lo, hi, Tq, Tk, qk_scale, dropout_p, seed64, softcap,
                         CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                         SOFTCAP: tl.constexpr, window, WINDOW: tl.constexpr):
    """Folds key tiles [lo, hi) into the online-softmax state (acc, m_i, l_i) of one query tile."""
    for start_n in range(lo, hi, BLOCK_N):
        tile_n = tl.arange(0, BLOCK_N)
        offs_n = start_n + tile_n
        key_ok = offs_n < Tk  # all true in unmasked tiles; the load mask costs next to nothing
        k_t = tl.load(_advance(k_base, start_n, stride_kn) + offs_d[:, None] * stride_kd + tile_n[None, :] * stride_kn,
                      mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if SOFTCAP:  # Gemma 2: natural score -> c * tanh(score / c), back in log2 units
            s = _tanh(s * (LN2 / softcap)) * (softcap * LOG2E)
        if MASKED:
            s = tl.where(_tile_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL), s, float("-inf"))
            if WINDOW:
                s = tl.where(_in_window(offs_m[:, None], offs_n[None, :], Tq, Tk, window, CAUSAL), s, float("-inf"))
        if HAS_KPM:
            s = tl.where(_key_kept(kpm_row, stride_kpmn, offs_n, Tk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf: subtract 0 there (exp2(-inf) = 0, not NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_sub)  # rescales the state to the new maximum
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped weights too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed64, offs_m[:, None], offs_n[None, :], Tk, dropout_p), p, 0.0)
        v = tl.load(_advance(v_base, start_n, stride_vn) + tile_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_fwd_rows(q, k_base, v_base, kpm_row,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                        offs_m, offs_d, d_ok, lo, full_end, end, Tq, Tk, qk_scale, dropout_p, keep_scale, seed64,
                        softcap, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, window, WINDOW: tl.constexpr):
    """One query tile over the key tiles [lo, full_end) (unmasked) and [full_end, end) (masked):
    (out (BLOCK_M, BLOCK_D) float32, normalised, dropout's keep scale applied; lse (BLOCK_M,) in log2
    units). A row with no visible key gets out = 0, lse = -inf. Shared by the prefill forward and the
    decode chunks (attention_decode.py)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attention_fwd_tiles(acc, m_i, l_i, q, k_base, v_base, kpm_row,
                                         stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                         offs_m, offs_d, d_ok, lo, full_end, Tq, Tk,
                                         qk_scale, dropout_p, seed64, softcap,
                                         CAUSAL, HAS_KPM, HAS_DROPOUT, False, DOT_PRECISION, BLOCK_N, SOFTCAP, window, WINDOW)
    acc, m_i, l_i = _attention_fwd_tiles(acc, m_i, l_i, q, k_base, v_base, kpm_row,
                                         stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                         offs_m, offs_d, d_ok, full_end, end, Tq, Tk,
                                         qk_scale, dropout_p, seed64, softcap,
                                         CAUSAL, HAS_KPM, HAS_DROPOUT, True, DOT_PRECISION, BLOCK_N, SOFTCAP, window, WINDOW)
    has_key = l_i > 0.0  # l_i >= 1 once a row has seen a visible key (its maximum adds exp2(0))
    l_safe = tl.where(has_key, l_i, 1.0)  # no 1/0 or log(0) even in the discarded where branch
    out = acc * tl.where(has_key, keep_scale / l_safe, 0.0)[:, None]
    return out, tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf"))


@_autotune(FWD_CONFIGS, FWD_INTERPRETER_CONFIG)
@triton.jit
def _attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_kpmb, stride_kpmn,
        H, KV_GROUP, Tq, Tk, qk_scale, dropout_p, keep_scale, seed, softcap, window, Q_BUCKET, K_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q (B, H, Tq, D), k, v (B, H // KV_GROUP, Tk, D) any strides (query head h reads kv head
    # h // KV_GROUP: GQA / MQA, never repeated in memory); kpm uint8 (B, Tk) or None;
    # out (B, H, Tq, D) and lse (B, H, Tq) float32, contiguous. Grid (cdiv(Tq, BLOCK_M), B * H).
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # Under causal masking the last query tiles have the most keys: launch them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + tile_m
    hk = h // KV_GROUP
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) columns, the first HEAD_DIM of them real
    d_ok = offs_d < HEAD_DIM
    row0 = bh.to(tl.int64) * Tq  # the head's first row in the contiguous (B * H * Tq) rows of out, lse
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_row = kpm_ptr + b * stride_kpmb if HAS_KPM else kpm_ptr
    seed64 = _philox_key(seed, bh)

    row_ok = offs_m < Tq
    q = tl.load(_advance(q_base, start_m, stride_qm) + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    key_lo, full_end, end = _key_tile_ranges(start_m, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    out, lse2 = _attention_fwd_rows(q, k_base, v_base, kpm_row, stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                    offs_m, offs_d, d_ok, key_lo, full_end, end, Tq, Tk, qk_scale, dropout_p,
                                    keep_scale, seed64, softcap, CAUSAL, HAS_KPM, HAS_DROPOUT, DOT_PRECISION,
                                    BLOCK_M, BLOCK_N, BLOCK_D, SOFTCAP, window, WINDOW)
    lse = lse2 * LN2
    tl.store(_advance(out_ptr, row0 + start_m, HEAD_DIM) + tile_m[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + row0 + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attention_bwd_delta_kernel(out_ptr, do_ptr, delta_ptr,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                H, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # out, do (B, H, Tq, D) any strides -> delta (B, H, Tq) float32. Grid (cdiv(Tq, BLOCK_M), B * H).
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + tile_m
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out_rows = _advance(out_ptr + b * stride_ob + h * stride_oh, start_m, stride_om)
    do_rows = _advance(do_ptr + b * stride_dob + h * stride_doh, start_m, stride_dom)
    out = tl.load(out_rows + tile_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                  mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_rows + tile_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * Tq + offs_m, tl.sum(out * do, 1), mask=offs_m < Tq)


@triton.jit
def _attention_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_row, delta_row, kpm_row,
                              stride_qm, stride_qd, stride_dom, stride_dod, stride_kpmn,
                              offs_n, offs_d, d_ok, lo, hi, Tq, Tk, qk_scale, dropout_p, keep_scale, seed64, softcap,
                              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              SOFTCAP: tl.constexpr, window, WINDOW: tl.constexpr):
    """Accumulates dK, dV (BLOCK_N, BLOCK_D) of one key tile over query tiles [lo, hi).
    Works in the transposed (key, query) orientation so that no (BLOCK_N, BLOCK_M) tile is transposed."""
    for start_m in range(lo, hi, BLOCK_M):
        tile_m = tl.arange(0, BLOCK_M)
        offs_m = start_m + tile_m
        row_ok = offs_m < Tq
        q_t = tl.load(_advance(q_base, start_m, stride_qm) + offs_d[:, None] * stride_qd + tile_m[None, :] * stride_qm,
                      mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(_advance(do_base, start_m, stride_dom) + tile_m[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        lse2 = _load_lse2(lse_row, offs_m, Tq)  # (BLOCK_M,)
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        if SOFTCAP:
            cap_t = _tanh(s_t * (LN2 / softcap))
            s_t = cap_t * (softcap * LOG2E)
        p_t = tl.math.exp2(s_t - lse2[None, :])  # the forward's softmax, recomputed
        if MASKED:
            p_t = tl.where(_tile_visible(offs_m[None, :], offs_n[:, None], Tq, Tk, CAUSAL), p_t, 0.0)
            if WINDOW:
                p_t = tl.where(_in_window(offs_m[None, :], offs_n[:, None], Tq, Tk, window, CAUSAL), p_t, 0.0)
        if HAS_KPM:
            p_t = tl.where(_key_kept(kpm_row, stride_kpmn, offs_n, Tk)[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M): dO vᵀ, transposed
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed64, offs_m[None, :], offs_n[:, None], Tk, dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # gradient of the scaled scores, transposed
        if SOFTCAP:
            ds_t = ds_t * (1.0 - cap_t * cap_t)  # through c * tanh(s / c)
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_row,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                            offs_m, offs_d, d_ok, lo, hi, Tq, Tk, qk_scale, dropout_p, keep_scale, seed64, softcap,
                            CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                            SOFTCAP: tl.constexpr, window, WINDOW: tl.constexpr):
    """Accumulates dQ (BLOCK_M, BLOCK_D) of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        tile_n = tl.arange(0, BLOCK_N)
        offs_n = start_n + tile_n
        ok = d_ok[:, None] & (offs_n < Tk)[None, :]
        k_t = tl.load(_advance(k_base, start_n, stride_kn) + offs_d[:, None] * stride_kd + tile_n[None, :] * stride_kn,
                      mask=ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        v_t = tl.load(_advance(v_base, start_n, stride_vn) + offs_d[:, None] * stride_vd + tile_n[None, :] * stride_vn,
                      mask=ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if SOFTCAP:
            cap = _tanh(s * (LN2 / softcap))
            s = cap * (softcap * LOG2E)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_tile_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL), p, 0.0)
            if WINDOW:
                p = tl.where(_in_window(offs_m[:, None], offs_n[None, :], Tq, Tk, window, CAUSAL), p, 0.0)
        if HAS_KPM:
            p = tl.where(_key_kept(kpm_row, stride_kpmn, offs_n, Tk)[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed64, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - cap * cap)  # through c * tanh(s / c)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq




@triton.jit
def _attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_kpmb, stride_kpmn,
        stride_dob, stride_doh, stride_dom, stride_dod,
        H, KV_GROUP, Tq, Tk, sm_scale, qk_scale, dropout_p, keep_scale, seed, softcap, window, Q_BUCKET, K_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DQ_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q, do (B, H, Tq, D), k, v (B, H, Tk, D) any strides; lse, delta (B, H, Tq) float32;
    # dq (B, H, Tq, D), dk, dv (B, H, Tk, D) contiguous. The two passes share this signature and
    # the per-head prologue; each writes only its own outputs:
    #   DQ_PASS False: a program owns a key tile of one kv head and accumulates its dK, dV over
    #                  the KV_GROUP query heads that read it. Grid (cdiv(Tk, BLOCK_N), B * H // KV_GROUP).
    #   DQ_PASS True:  a program owns a query tile, accumulates its dQ.   Grid (cdiv(Tq, BLOCK_M), B * H).
    # k, v, dk, dv have H // KV_GROUP heads (GQA / MQA; KV_GROUP = 1 is plain multi-head attention).
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) columns, the first HEAD_DIM of them real
    d_ok = offs_d < HEAD_DIM
    kpm_ptr_ = kpm_ptr
    if DQ_PASS:
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // KV_GROUP
        q_base = q_ptr + b * stride_qb + h * stride_qh
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        row0 = bh.to(tl.int64) * Tq  # the head's first row in the contiguous (B * H * Tq) rows of lse, delta, dq
        lse_row = lse_ptr + row0
        delta_row = delta_ptr + row0
        kpm_row = kpm_ptr + b * stride_kpmb if HAS_KPM else kpm_ptr_
        seed64 = _philox_key(seed, bh)
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the busiest query tiles first
        tile_m = tl.arange(0, BLOCK_M)
        offs_m = start_m + tile_m
        row_ok = offs_m < Tq
        ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_advance(q_base, start_m, stride_qm) + tile_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(_advance(do_base, start_m, stride_dom) + tile_m[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod,
                     mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse2 = _load_lse2(lse_row, offs_m, Tq)  # (BLOCK_M,)
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        key_lo, full_end, end = _key_tile_ranges(start_m, Tq, Tk, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        dq = _attention_bwd_dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_row,
                                     stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                     offs_m, offs_d, d_ok, key_lo, full_end, Tq, Tk,
                                     qk_scale, dropout_p, keep_scale, seed64, softcap,
                                     CAUSAL, HAS_KPM, HAS_DROPOUT, False, DOT_PRECISION, BLOCK_N, SOFTCAP, window, WINDOW)
        dq = _attention_bwd_dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_row,
                                     stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmn,
                                     offs_m, offs_d, d_ok, full_end, end, Tq, Tk,
                                     qk_scale, dropout_p, keep_scale, seed64, softcap,
                                     CAUSAL, HAS_KPM, HAS_DROPOUT, True, DOT_PRECISION, BLOCK_N, SOFTCAP, window, WINDOW)
        tl.store(_advance(dq_ptr, row0 + start_m, HEAD_DIM) + tile_m[:, None] * HEAD_DIM + offs_d[None, :],
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=ok)
    else:
        bhk = tl.program_id(1)  # b * Hkv + kv head
        Hkv = H // KV_GROUP
        b = (bhk // Hkv).to(tl.int64)
        hk = (bhk % Hkv).to(tl.int64)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        kpm_row = kpm_ptr + b * stride_kpmb if HAS_KPM else kpm_ptr_
        start_n = tl.program_id(0) * BLOCK_N  # under causal masking the first key tiles have the most queries
        tile_n = tl.arange(0, BLOCK_N)
        offs_n = start_n + tile_n
        ok = (offs_n < Tk)[:, None] & d_ok[None, :]
        k = tl.load(_advance(k_base, start_n, stride_kn) + tile_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(_advance(v_base, start_n, stride_vn) + tile_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        q_hi = Tq
        lo, full_start = _query_tile_ranges(start_n, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
        if WINDOW:  # only the query tiles whose windows reach this key tile, all masked
            lo, q_hi = _window_query_range(start_n, Tq, Tk, window, CAUSAL, BLOCK_M, BLOCK_N)
            full_start = q_hi
        # The group's query heads in order, summed in registers: deterministic, no atomics.
        for g in range(0, KV_GROUP):
            h = hk * KV_GROUP + g
            bh = b * H + h  # the query head's flat index (its lse, delta rows and Philox key)
            q_base = q_ptr + b * stride_qb + h * stride_qh
            do_base = do_ptr + b * stride_dob + h * stride_doh
            lse_row = lse_ptr + bh * Tq
            delta_row = delta_ptr + bh * Tq
            seed64 = _philox_key(seed, bh)
            dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_row, delta_row, kpm_row,
                                               stride_qm, stride_qd, stride_dom, stride_dod, stride_kpmn,
                                               offs_n, offs_d, d_ok, lo, tl.minimum(full_start, Tq), Tq, Tk, qk_scale,
                                               dropout_p, keep_scale, seed64, softcap,
                                               CAUSAL, HAS_KPM, HAS_DROPOUT, True, DOT_PRECISION, BLOCK_M, SOFTCAP, window, WINDOW)
            dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_row, delta_row, kpm_row,
                                               stride_qm, stride_qd, stride_dom, stride_dod, stride_kpmn,
                                               offs_n, offs_d, d_ok, full_start, q_hi, Tq, Tk, qk_scale,
                                               dropout_p, keep_scale, seed64, softcap,
                                               CAUSAL, HAS_KPM, HAS_DROPOUT, False, DOT_PRECISION, BLOCK_M, SOFTCAP, window, WINDOW)
        row0 = bhk.to(tl.int64) * Tk + start_n  # the tile's first row in the contiguous (B * Hkv * Tk) rows of dk, dv
        in_tile = tile_n[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(_advance(dk_ptr, row0, HEAD_DIM) + in_tile, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=ok)
        tl.store(_advance(dv_ptr, row0, HEAD_DIM) + in_tile, dv.to(dv_ptr.dtype.element_ty), mask=ok)


# The two passes, each autotuned over its own tiles (Triton compiles each DQ_PASS apart).
_attention_bwd_dkdv_kernel = _autotune(DKDV_CONFIGS, DKDV_INTERPRETER_CONFIG)(_attention_bwd_kernel)
_attention_bwd_dq_kernel = _autotune(DQ_CONFIGS, DQ_INTERPRETER_CONFIG)(_attention_bwd_kernel)



# ----------------------------------------------------------------------------- host side

def _tile_extents(head_dim):
    """The elements a tile of any kernel spans along the T and D dims of a (B, H, T, D) tensor."""
    return {2: MAX_TILE_ROWS, 3: triton.next_power_of_2(head_dim)}


def _launch_args(op, q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap):
    """The arguments every attention kernel shares: (pointers, strides, scalars), after the
    `triton` backend's declared capabilities (fastgpt/backends.py) are checked as a safety net."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    features = backends.attention_features(H, k.shape[1], window or None, softcap or None)
    _launch.check_capabilities(op, "attention", q, head_dim=D, features=features)
    torch._check(B * H <= MAX_GRID_Y, lambda: f"fastgpt::{op}: B * H must be at most {MAX_GRID_Y} (the launch "
                                              f"grid), got {B * H}")
    Hkv = k.shape[1]
    torch._check(k.shape == v.shape and k.shape[0] == B and Hkv > 0 and H % Hkv == 0 and k.shape[3] == D,
                 lambda: f"fastgpt::{op}: q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H % Hkv == 0 must agree, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype,
                 lambda: f"fastgpt::{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(key_padding_mask is None or (key_padding_mask.dtype == torch.bool
                                              and key_padding_mask.shape == (B, Tk)),
                 lambda: f"fastgpt::{op}: key_padding_mask must be bool (B, Tk) = ({B}, {Tk}), "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    # bool (B, Tk) read as bytes: Triton loads uint8 more portably than i1.
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    # In-tile offsets stay int32 (the header): copy the rare views whose tiles would span more.
    q, k, v = (_launch.int32_tile_offsets(t, _tile_extents(D)) for t in (q, k, v))
    kpm = _launch.int32_tile_offsets(kpm, {1: Tk})  # its key index is absolute, not in-tile
    kpm_strides = kpm.stride() if kpm is not None else (0, 0)
    pointers = (q, k, v, kpm)
    strides = (*q.stride(), *k.stride(), *v.stride(), *kpm_strides)
    scalars = dict(H=H, KV_GROUP=H // Hkv, Tq=Tq, Tk=Tk, qk_scale=scale * LOG2E.value, dropout_p=dropout_p,
                   keep_scale=1.0 / (1.0 - dropout_p), seed=seed & 0xFFFFFFFF,
                   softcap=float(softcap) if softcap else 1.0, SOFTCAP=bool(softcap),
                   window=int(window) if window else 0, WINDOW=bool(window),
                   Q_BUCKET=_launch.length_bucket(Tq), K_BUCKET=_launch.length_bucket(Tk),
                   HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),  # the tile width holding the head dim
                   CAUSAL=causal, HAS_KPM=kpm is not None, HAS_DROPOUT=dropout_p > 0.0,
                   DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return pointers, strides, scalars


@torch.library.custom_op("fastgpt::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  causal: bool, scale: float, dropout_p: float, seed: int, window: int,
                  softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Tq, D), k, v (B, H, Tk, D), key_padding_mask bool (B, Tk) or None
    -> out (B, H, Tq, D) contiguous in q's dtype, lse (B, H, Tq) float32 (natural log)."""
    B, H, Tq, D = q.shape
    pointers, strides, scalars = _launch_args("triton_attention_fwd", q, k, v, key_padding_mask, causal, scale,
                                              dropout_p, seed, window, softcap)
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)  # (B, H, Tq, D)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)  # (B, H, Tq)
    with _launch.device_guard(q):
        if Tq <= backends.DECODE_MAX_QUERIES:  # decoding: the split-KV kernels of attention_decode.py
            from .attention_decode import attention_decode_fwd
            attention_decode_fwd(pointers, strides, scalars, out, lse)
        else:
            _attention_fwd_kernel[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
                *pointers, out, lse, *strides, **scalars)
    return out, lse


@torch.library.custom_op("fastgpt::triton_attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: int, window: int, softcap: float,
                  grad_lse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, out (B, H, Tq, D), lse (B, H, Tq) from attention_fwd, grad_lse (B, H, Tq) float32
    or None -> grad_q (B, H, Tq, D), grad_k, grad_v (B, H, Tk, D), contiguous in the inputs' dtype."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    op = "triton_attention_bwd"
    pointers, strides, scalars = _launch_args(op, q, k, v, key_padding_mask, causal, scale, dropout_p, seed,
                                              window, softcap)
    torch._check(grad_out.shape == q.shape and out.shape == q.shape,
                 lambda: f"fastgpt::{op}: grad_out and out must have q's shape {tuple(q.shape)}, "
                         f"got {tuple(grad_out.shape)} and {tuple(out.shape)}")
    torch._check(lse.shape == (B, H, Tq) and lse.dtype == torch.float32 and lse.is_contiguous(),
                 lambda: f"fastgpt::{op}: lse must be contiguous float32 (B, H, Tq) = ({B}, {H}, {Tq}), "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    torch._check(grad_lse is None or (grad_lse.shape == lse.shape and grad_lse.dtype == torch.float32),
                 lambda: f"fastgpt::{op}: grad_lse must be float32 (B, H, Tq) = ({B}, {H}, {Tq}) like lse, "
                         f"got {grad_lse.dtype} {tuple(grad_lse.shape)}")
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)  # (B, H, Tq): rowsum(dO * O)
    grad_q = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)  # (B, H, Tq, D)
    Hkv = k.shape[1]
    grad_k = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=q.device)  # (B, Hkv, Tk, D)
    grad_v = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=q.device)  # (B, Hkv, Tk, D)
    grad_out, out = (_launch.int32_tile_offsets(t, _tile_extents(D)) for t in (grad_out, out))
    # Both passes take the same arguments (_attention_bwd_kernel's signature).
    bwd_args = (*pointers, grad_out, lse, delta, grad_q, grad_k, grad_v, *strides, *grad_out.stride())
    with _launch.device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(Tq, DELTA_BLOCK_M), B * H)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Tq, HEAD_DIM=D,
            BLOCK_D=scalars["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M)
        if grad_lse is not None:  # d lse_i / d s_ij = P_ij: lse's gradient enters dS = P ∘ (dP - delta) here
            delta.sub_(grad_lse)
        _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
            *bwd_args, sm_scale=scale, DQ_PASS=False, **scalars)
        _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
            *bwd_args, sm_scale=scale, DQ_PASS=True, **scalars)
    return grad_q, grad_k, grad_v


_registration.register("attention", impl="triton_")  # fake impls, autograd, double-backward guard


def attention(q, k, v, causal, key_padding_mask, dropout_p, scale, seed, window=0, softcap=0.0, return_lse=False):
    """The `triton` backend's attention: q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D), and
    lse (B, H, Tq) float32 with return_lse. Inputs are validated by fastgpt.ops; differentiable in
    q, k, v (through out and lse)."""
    out, lse = attention_fwd(q, k, v, key_padding_mask, causal, scale, dropout_p, seed, window, softcap)
    return (out, lse) if return_lse else out
