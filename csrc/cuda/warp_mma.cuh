// Warp-level building blocks of the attention kernels: swizzled shared-memory tiles,
// cp.async tile loads (the PTX wrappers are in ptx.cuh), and two interchangeable warp
// GEMMs that leave their result in the same register layout:
//   - tensor cores: ldmatrix + mma.sync.m16n8k16 (float16 / bfloat16 in, float32 out);
//   - SIMT: plain float32 FMAs, for float32 inputs (slower, but exact float32 math).
//
// The accumulator layout (PTX ISA "Matrix Fragments for mma.m16n8k16", C/D matrix),
// used by every kernel here, tensor cores or not. A warp owns a 16 x (8 * kNTiles)
// strip; lane = 4 * g + t (g = lane / 4 "groupID", t = lane % 4 "threadID_in_group")
// holds, for each 8-column tile n:
//     acc[n][0] = C[g    ][8n + 2t]     acc[n][1] = C[g    ][8n + 2t + 1]
//     acc[n][2] = C[g + 8][8n + 2t]     acc[n][3] = C[g + 8][8n + 2t + 1]
// so a row is spread over the 4 lanes of a quad (row reductions: shuffles xor 1, 2).
//
// A operand (16 x 16, "row"), four 32-bit registers of two 16-bit values each
// (low half = lower column):
//     a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
// B operand (16 x 8, "col"): b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
// Hence an accumulator strip 16 x 16k, rounded to 16-bit, *is* the A operand of a
// following GEMM over k (FlashAttention's P = softmax(S) never leaves registers).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/ptx.cuh"
#include "cuda/vector_io.cuh"

namespace fastgpt::cuda {

// ---------------------------------------------------------------------------------
// Shared-memory tiles.
//
// A tile is row-major with kCols elements per row, stored in 16-byte chunks (the unit
// of cp.async and of one ldmatrix row). ldmatrix reads 8 rows at the same chunk column;
// with rows of 128 bytes or more those would all hit the same 4 banks. The chunk index
// is therefore XOR-ed with the row's position among the 8 consecutive 128-byte lines
// (rows narrower than 128 bytes share a line: kRowsPerLine of them), which spreads any
// 8 consecutive rows at one chunk column over all 32 banks. Rows are written the same
// way (one 16-byte chunk per thread), so the permutation is invisible outside this struct.
template <typename Element, int kCols>
struct SmemTile {
  static constexpr int kChunkElems = 16 / int(sizeof(Element));
  static constexpr int kChunksPerRow = kCols / kChunkElems;
  static_assert(kCols % kChunkElems == 0 && kChunksPerRow >= 2, "rows must be whole 16-byte chunks");
  static constexpr int kXorMask = (kChunksPerRow < 8 ? kChunksPerRow : 8) - 1;
  static constexpr int kRowsPerLine = kChunksPerRow < 8 ? 8 / kChunksPerRow : 1;

  using element_type = Element;
  Element* data;

  __device__ __forceinline__ int chunk_offset(int row, int chunk) const {
    return row * kCols + ((chunk ^ ((row / kRowsPerLine) & kXorMask)) * kChunkElems);
  }
  __device__ __forceinline__ int offset(int row, int col) const {
    return chunk_offset(row, col / kChunkElems) + col % kChunkElems;
  }
  __device__ __forceinline__ Element& at(int row, int col) const { return data[offset(row, col)]; }
};

// Views of a tile as a GEMM operand with logical coordinates (i, j):
//   RowMajorView:   (i, j) -> tile(row0 + i, col0 + j)
//   TransposedView: (i, j) -> tile(row0 + j, col0 + i)
// e.g. S = Q Kᵀ reads B(k = d, n = key) = K(key, d): TransposedView of the K tile.
template <class Tile>
struct RowMajorView {
  Tile tile;
  int row0, col0;
  __device__ __forceinline__ float at(int i, int j) const { return to_float(tile.at(row0 + i, col0 + j)); }
};
template <class Tile>
struct TransposedView {
  Tile tile;
  int row0, col0;
  __device__ __forceinline__ float at(int i, int j) const { return to_float(tile.at(row0 + j, col0 + i)); }
};
template <class Tile>
__device__ __forceinline__ RowMajorView<Tile> row_major(Tile tile, int row0, int col0) { return {tile, row0, col0}; }
template <class Tile>
__device__ __forceinline__ TransposedView<Tile> transposed(Tile tile, int row0, int col0) { return {tile, row0, col0}; }

// ---------------------------------------------------------------------------------
// Tile copies. cp.async (csrc/cuda/ptx.cuh) copies global -> shared without registers;
// commit groups and waits form the software pipeline (double buffering) of the kernels.
// Loads rows [0, kRows) and columns [0, valid_cols) of a global matrix with `row_stride`
// elements between rows into `tile`; rows >= valid_rows and columns >= valid_cols (a multiple
// of 16 bytes) become zeros, so that padding keys and queries, and the columns of a head dim
// narrower than the tile, contribute exact zeros, never stale data. `gmem` must stay a valid
// address even when no row is valid: it is passed to cp.async with src-size 0.
template <int kRows, int kThreads, class Tile, typename Element>
__device__ __forceinline__ void load_tile_async(Tile tile, const Element* gmem, int64_t row_stride, int valid_rows,
                                                int valid_cols) {
  constexpr int kChunks = kRows * Tile::kChunksPerRow;
  for (int chunk = threadIdx.x; chunk < kChunks; chunk += kThreads) {
    const int row = chunk / Tile::kChunksPerRow, col_chunk = chunk % Tile::kChunksPerRow;
    const bool valid = row < valid_rows && col_chunk * Tile::kChunkElems < valid_cols;
    const Element* source = valid ? gmem + row * row_stride + col_chunk * Tile::kChunkElems : gmem;
    cp_async_16(tile.data + tile.chunk_offset(row, col_chunk), source, valid);
  }
}

// Copies rows [0, valid_rows) and columns [0, cols) of a tile to a contiguous (rows, cols)
// global matrix (cols <= the tile's, a multiple of 16 bytes), 16 bytes per thread and
// instruction (coalesced). Needs the tile complete: call after a __syncthreads that follows the writes.
template <int kRows, int kThreads, class Tile, typename Element>
__device__ __forceinline__ void store_tile(Tile tile, Element* gmem, int valid_rows, int cols) {
  constexpr int kChunks = kRows * Tile::kChunksPerRow;
  for (int chunk = threadIdx.x; chunk < kChunks; chunk += kThreads) {
    const int row = chunk / Tile::kChunksPerRow, col_chunk = chunk % Tile::kChunksPerRow;
    if (row < valid_rows && col_chunk * Tile::kChunkElems < cols) {
      *reinterpret_cast<uint4*>(gmem + int64_t(row) * cols + col_chunk * Tile::kChunkElems) =
          *reinterpret_cast<const uint4*>(tile.data + tile.chunk_offset(row, col_chunk));
    }
  }
}

// ---------------------------------------------------------------------------------
// Packing float pairs into 16-bit pairs (low half = first value), and writing an
// accumulator pair (two adjacent columns, same 16-byte chunk since `col` is even).
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Element, __half>) {
    return bit_copy<uint32_t>(__floats2half2_rn(lo, hi));
  } else {
    return bit_copy<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
}

template <class Tile>
__device__ __forceinline__ void store_pair(Tile tile, int row, int col, float v0, float v1) {
  using Element = typename Tile::element_type;
  if constexpr (kIsFloat32<Element>) {
    *reinterpret_cast<float2*>(&tile.at(row, col)) = make_float2(v0, v1);
  } else {
    *reinterpret_cast<uint32_t*>(&tile.at(row, col)) = pack2<Element>(v0, v1);
  }
}

// Writes a warp's accumulator strip (16 x 8·kNTiles, layout above) into `tile` at
// (row0, col0).
template <int kNTiles, class Tile>
__device__ __forceinline__ void store_accumulators(Tile tile, int row0, int col0, const float (&acc)[kNTiles][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
    store_pair(tile, row0 + g, col0 + 8 * n + 2 * t, acc[n][0], acc[n][1]);
    store_pair(tile, row0 + g + 8, col0 + 8 * n + 2 * t, acc[n][2], acc[n][3]);
  }
}

// ---------------------------------------------------------------------------------
// Tensor-core path.
//
// ldmatrix.x4 loads four 8x8 blocks of 16-bit values; lane l gives the address of row
// l % 8 of block l / 8, and receives in register r the values (row l / 4, columns
// 2(l % 4), 2(l % 4) + 1) of block r -- or with .trans the values (rows 2(l % 4),
// 2(l % 4) + 1; column l / 4), i.e. the block transposed. Comparing with the operand
// layouts above gives, for the 16x16 A operand at logical (m, k) = (0, 0):
//   register r covers m in [8(r % 2), +8), k in [8(r / 2), +8)
// and for a pair of B operands (two 8-column tiles, 16 x 16 logical (k, n)):
//   register r covers k in [8(r % 2), +8), n in [8(r / 2), +8)
//   (r = 0, 1: b[0], b[1] of n-tile 0; r = 2, 3: those of n-tile 1).
// Each register holds two consecutive k of one row (A) or column (B), so a tile whose
// contiguous (column) direction is k is read without .trans -- the A of a RowMajorView,
// the B of a TransposedView -- and with .trans otherwise.
//
// A operand (16 x 16 at logical (0, 16 ks)) from a view. Block = lane / 8, row lane % 8.
template <class Tile>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const RowMajorView<Tile>& view, int ks) {
  const int lane = threadIdx.x % 32, block = lane / 8;
  const int m = (lane % 8) + 8 * (block % 2), k = 16 * ks + 8 * (block / 2);  // tile(m, k): k contiguous
  ldmatrix_x4(a, &view.tile.at(view.row0 + m, view.col0 + k));
}
template <class Tile>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const TransposedView<Tile>& view, int ks) {
  const int lane = threadIdx.x % 32, block = lane / 8;
  const int m = 8 * (block % 2), k = 16 * ks + (lane % 8) + 8 * (block / 2);  // tile(k, m): m contiguous
  ldmatrix_x4_trans(a, &view.tile.at(view.row0 + k, view.col0 + m));
}
// Two B operands (logical k in [16 ks, +16), n in [16 np, +16)).
template <class Tile>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], const TransposedView<Tile>& view, int ks, int np) {
  const int lane = threadIdx.x % 32, block = lane / 8;
  const int n = 16 * np + (lane % 8) + 8 * (block / 2), k = 16 * ks + 8 * (block % 2);  // tile(n, k): k contiguous
  ldmatrix_x4(b, &view.tile.at(view.row0 + n, view.col0 + k));
}
template <class Tile>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], const RowMajorView<Tile>& view, int ks, int np) {
  const int lane = threadIdx.x % 32, block = lane / 8;
  const int k = 16 * ks + (lane % 8) + 8 * (block % 2), n = 16 * np + 8 * (block / 2);  // tile(k, n): n contiguous
  ldmatrix_x4_trans(b, &view.tile.at(view.row0 + k, view.col0 + n));
}

// A operands held in registers: kKSteps 16 x 16 blocks along k.
template <int kKSteps>
struct RegisterA {
  uint32_t frag[kKSteps][4];
};
template <int kKSteps>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const RegisterA<kKSteps>& regs, int ks) {
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = regs.frag[ks][r];
}

// An accumulator strip 16 x 16·kKSteps rounded to Element: the A operand of a GEMM over
// its columns (register r of block ks: columns 16 ks + 8 (r / 2) + 2t, rows g + 8 (r % 2)).
template <typename Element, int kNTiles>
__device__ __forceinline__ RegisterA<kNTiles / 2> accumulators_as_a(const float (&acc)[kNTiles][4]) {
  RegisterA<kNTiles / 2> regs;
#pragma unroll
  for (int ks = 0; ks < kNTiles / 2; ++ks) {
    regs.frag[ks][0] = pack2<Element>(acc[2 * ks][0], acc[2 * ks][1]);
    regs.frag[ks][1] = pack2<Element>(acc[2 * ks][2], acc[2 * ks][3]);
    regs.frag[ks][2] = pack2<Element>(acc[2 * ks + 1][0], acc[2 * ks + 1][1]);
    regs.frag[ks][3] = pack2<Element>(acc[2 * ks + 1][2], acc[2 * ks + 1][3]);
  }
  return regs;
}

// acc (16 x 8·kNTiles) += A (16 x kK) · B (kK x 8·kNTiles) on tensor cores. Only k < k_valid
// and the columns n < n_valid (both warp-uniform, multiples of 16) are computed: a head dim
// narrower than the kernel's width skips the zero columns of its tiles at run time, while the
// loops stay unrolled over static bounds (registers, not local memory).
template <typename Element, int kK, int kNTiles, class AOperand, class BView>
__device__ __forceinline__ void warp_gemm_tensor_cores(float (&acc)[kNTiles][4], const AOperand& a_operand,
                                                       const BView& b_view, int k_valid = kK,
                                                       int n_valid = 8 * kNTiles) {
  static_assert(kK % 16 == 0 && kNTiles % 2 == 0, "tensor-core GEMM works on 16 x 16 blocks");
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    if (16 * ks >= k_valid) break;
    uint32_t a[4];
    load_a(a, a_operand, ks);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      if (16 * np >= n_valid) break;
      uint32_t b[4];
      load_b_pair(b, b_view, ks, np);
      mma_16816<Element>(acc[2 * np], a, b[0], b[1]);
      mma_16816<Element>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------
// SIMT path: the same accumulator layout, computed with float32 FMAs. Each lane needs
// rows g and g + 8 of A (shared by its quad: broadcast reads) and columns 8n + 2t,
// 8n + 2t + 1 of B. k_valid, n_valid: as for the tensor cores.
template <int kK, int kNTiles, class AView, class BView>
__device__ __forceinline__ void warp_gemm_simt(float (&acc)[kNTiles][4], const AView& a_view, const BView& b_view,
                                               int k_valid = kK, int n_valid = 8 * kNTiles) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int k_end = min(kK, k_valid);
#pragma unroll 4
  for (int k = 0; k < k_end; ++k) {
    const float a_lo = a_view.at(g, k), a_hi = a_view.at(g + 8, k);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      if (8 * n >= n_valid) break;
      const float b0 = b_view.at(k, 8 * n + 2 * t), b1 = b_view.at(k, 8 * n + 2 * t + 1);
      acc[n][0] = fmaf(a_lo, b0, acc[n][0]);
      acc[n][1] = fmaf(a_lo, b1, acc[n][1]);
      acc[n][2] = fmaf(a_hi, b0, acc[n][2]);
      acc[n][3] = fmaf(a_hi, b1, acc[n][3]);
    }
  }
}

template <int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kNTiles][4]) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  }
}

}  // namespace fastgpt::cuda
