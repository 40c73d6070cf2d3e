// Layer norm over the last dim of x (N, C): kernels and their launchers (no torch here:
// layer_norm.cu checks arguments, host.h allocates and fills LayerNormParams).
//
// Forward  y = (x - mean) · rstd · w + b,  rstd = 1 / sqrt(var + eps), float32 statistics.
// float32 rows far from zero (x = 1e3 + noise) lose the noise when summed as is: the
// forward sums x - x[0] (exact, the values being close) and keeps mean = x[0] + delta
// split, so x - mean is accurate even where mean itself rounds; the backward re-centres
// x - saved_mean on its exact row mean, which absorbs the rounding of the saved mean.
// Backward with x̂ = (x - mean) · rstd and ĝ = g · w (g = dL/dy):
//   dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂))
//   dw = Σ_rows g · x̂,  db = Σ_rows g
// dw and db are sums over all rows: each block accumulates its rows' share per column
// (in registers, or in its own row of the partial buffer), writes one partial row, and a
// second kernel adds the partial rows up (no global atomics).
//
// Two shapes of kernel:
//   vector: C % kVec == 0 and 16-byte aligned rows; each row is read once into registers
//           with 16-byte loads by kThreadsPerRow threads (a warp for C <= 32 · kVecs ·
//           kVec, else the whole 256-thread block), each holding at most kVecs vectors;
//   generic: any C, one block per row, scalar loads, the row re-read from cache.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/norm_common.cuh"
#include "cuda/ptx.cuh"
#include "cuda/vector_io.cuh"

namespace fastgpt::cuda {

struct LayerNormParams {
  const void* x;       // (N, C) contiguous
  const void* weight;  // (C,)
  const void* bias;    // (C,)  forward only
  const void* grad_y;  // (N, C) contiguous, backward only
  void* y;             // (N, C) forward output
  void* grad_x;        // (N, C) backward output
  float* mean;         // (N,) forward output, backward input
  float* rstd;         // (N,) forward output, backward input
  float* partial;      // (partial_rows, 2, C) backward scratch: per block Σ g·x̂ and Σ g
  void* grad_weight;   // (C,) backward output
  void* grad_bias;     // (C,) backward output
  int64_t rows;        // N
  int cols;            // C
  int partial_rows;    // blocks of the backward kernel
  float eps;
};

constexpr int kLayerNormThreads = kNormThreads;
constexpr int kLayerNormMaxVecs = kNormMaxVecs;  // vectors per thread on the vector path

// x̂ = (x - mean) · rstd with mean = saved_mean + correction (kept apart, never rounded
// into one float): x - saved_mean is exact for x near saved_mean, and the correction is
// subtracted from that small number.
__device__ __forceinline__ float normalised(float x, float saved_mean, float correction, float rstd) {
  return ((x - saved_mean) - correction) * rstd;
}

// ---------------------------------------------------------------------------------
// Vector path.
template <typename Element, int kThreadsPerRow>
__global__ void __launch_bounds__(kLayerNormThreads) layer_norm_fwd_vector_kernel(const LayerNormParams p) {
  constexpr int kVec = kVecElems<Element>, kRowsPerBlock = kLayerNormThreads / kThreadsPerRow;
  __shared__ float scratch[kLayerNormThreads / 32];
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int part = threadIdx.x % kThreadsPerRow, n_vecs = p.cols / kVec;
  // Block-wide rows: every thread takes part in the reductions, so no early return.
  const bool active = row < p.rows;
  const Element* x = static_cast<const Element*>(p.x) + row * p.cols;

  const float shift = active ? to_float(x[0]) : 0.0f;
  float values[kLayerNormMaxVecs][kVec];  // x - shift
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
    if (active && vec < n_vecs) {
      load_vector(x + vec * kVec, values[j]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += values[j][i] -= shift;
    }
  }
  const float delta = row_sum<kThreadsPerRow>(sum, scratch) / p.cols;  // mean = shift + delta
  float squares = 0.0f;  // two passes over registers: no cancellation in E[x²] - mean²
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVecs; ++j) {
    if (active && part + j * kThreadsPerRow < n_vecs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) squares += (values[j][i] - delta) * (values[j][i] - delta);
    }
  }
  const float rstd = rsqrtf(row_sum<kThreadsPerRow>(squares, scratch) / p.cols + p.eps);
  if (!active) return;
  if (part == 0) {
    p.mean[row] = shift + delta;
    p.rstd[row] = rstd;
  }
  Element* y = static_cast<Element*>(p.y) + row * p.cols;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
    if (vec < n_vecs) {
      float w[kVec], b[kVec], out[kVec];
      load_vector(static_cast<const Element*>(p.weight) + vec * kVec, w);
      load_vector(static_cast<const Element*>(p.bias) + vec * kVec, b);
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = (values[j][i] - delta) * rstd * w[i] + b[i];
      store_vector(y + vec * kVec, out);
    }
  }
}

// Rows are strided over the grid (gridDim.x == p.partial_rows blocks); each thread
// keeps the dw, db shares of its columns in registers. With warp rows the warps of a
// block hold the same columns and add them up in shared memory before the block
// writes its partial row.
// At least two blocks per SM (<= 128 registers): the kernel is bandwidth-bound.
template <typename Element, int kThreadsPerRow>
__global__ void __launch_bounds__(kLayerNormThreads, 2) layer_norm_bwd_vector_kernel(const LayerNormParams p) {
  constexpr int kVec = kVecElems<Element>, kRowsPerBlock = kLayerNormThreads / kThreadsPerRow;
  __shared__ float scratch[kLayerNormThreads / 32];
  const int part = threadIdx.x % kThreadsPerRow, n_vecs = p.cols / kVec;

  // x and g stay packed between the two passes over a row (half the registers of floats); the
  // dw, db shares are float32. w is re-read for every row (it stays in L1): kept in registers too,
  // it would push the 16-bit kernels past the 128 registers of two blocks per SM, into spills
  // (tools/gpu_resources.py).
  const Element* weight = static_cast<const Element*>(p.weight);
  float sums[2][kLayerNormMaxVecs][kVec];  // dw, db
  auto& dw = sums[0];
  auto& db = sums[1];
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
#pragma unroll
    for (int i = 0; i < kVec; ++i) dw[j][i] = db[j][i] = 0.0f;
  }

  // Every thread of a block runs the same number of iterations (block reductions).
  const int64_t row_step = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < p.rows; row0 += row_step) {
    const int64_t row = row0 + threadIdx.x / kThreadsPerRow;
    const bool active = row < p.rows;
    const float saved_mean = active ? p.mean[row] : 0.0f, rstd = active ? p.rstd[row] : 0.0f;
    const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
    const Element* grad_y = static_cast<const Element*>(p.grad_y) + row * p.cols;
    uint4 x_raw[kLayerNormMaxVecs], g_raw[kLayerNormMaxVecs];
    float sum_centred = 0.0f;
#pragma unroll
    for (int j = 0; j < kLayerNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (active && vec < n_vecs) {
        x_raw[j] = *reinterpret_cast<const uint4*>(x + vec * kVec);
        g_raw[j] = *reinterpret_cast<const uint4*>(grad_y + vec * kVec);
        float xs[kVec];
        unpack_vector<Element>(x_raw[j], xs);
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum_centred += xs[i] - saved_mean;
      }
    }
    // The exact mean is saved_mean + correction (correction: the rounding of saved_mean).
    const float correction = row_sum<kThreadsPerRow>(sum_centred, scratch) / p.cols;
    float sum_wg = 0.0f, sum_wg_xhat = 0.0f;
#pragma unroll
    for (int j = 0; j < kLayerNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (active && vec < n_vecs) {
        float xs[kVec], g[kVec], w[kVec];
        unpack_vector<Element>(x_raw[j], xs);
        unpack_vector<Element>(g_raw[j], g);
        load_vector(weight + vec * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float xhat = normalised(xs[i], saved_mean, correction, rstd), wg = w[i] * g[i];
          sum_wg += wg;
          sum_wg_xhat += wg * xhat;
          dw[j][i] += g[i] * xhat;
          db[j][i] += g[i];
        }
      }
    }
    const float mean_wg = row_sum<kThreadsPerRow>(sum_wg, scratch) / p.cols;
    const float mean_wg_xhat = row_sum<kThreadsPerRow>(sum_wg_xhat, scratch) / p.cols;
    if (!active) continue;
    Element* grad_x = static_cast<Element*>(p.grad_x) + row * p.cols;
#pragma unroll
    for (int j = 0; j < kLayerNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (vec < n_vecs) {
        float xs[kVec], g[kVec], w[kVec], dx[kVec];
        unpack_vector<Element>(x_raw[j], xs);
        unpack_vector<Element>(g_raw[j], g);
        load_vector(weight + vec * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          dx[i] = rstd * (w[i] * g[i] - mean_wg - normalised(xs[i], saved_mean, correction, rstd) * mean_wg_xhat);
        }
        store_vector(grad_x + vec * kVec, dx);
      }
    }
  }

  write_block_partials<kThreadsPerRow>(sums, p.partial + int64_t(blockIdx.x) * 2 * p.cols, p.cols);
}

// ---------------------------------------------------------------------------------
// Generic path: one block per row, columns strided over the threads.
template <typename Element>
__global__ void __launch_bounds__(kLayerNormThreads) layer_norm_fwd_generic_kernel(const LayerNormParams p) {
  __shared__ float scratch[kLayerNormThreads / 32];
  const int64_t row = blockIdx.x;
  const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
  const Element* weight = static_cast<const Element*>(p.weight);
  const Element* bias = static_cast<const Element*>(p.bias);
  const float shift = to_float(x[0]);
  float sum = 0.0f;
  for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) sum += to_float(x[col]) - shift;
  const float delta = row_sum<kLayerNormThreads>(sum, scratch) / p.cols;  // mean = shift + delta
  float squares = 0.0f;
  for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) {
    const float centred = (to_float(x[col]) - shift) - delta;
    squares += centred * centred;
  }
  const float rstd = rsqrtf(row_sum<kLayerNormThreads>(squares, scratch) / p.cols + p.eps);
  if (threadIdx.x == 0) {
    p.mean[row] = shift + delta;
    p.rstd[row] = rstd;
  }
  Element* y = static_cast<Element*>(p.y) + row * p.cols;
  for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) {
    const float centred = (to_float(x[col]) - shift) - delta;
    y[col] = from_float<Element>(centred * rstd * to_float(weight[col]) + to_float(bias[col]));
  }
}

// Rows strided over the grid; block b accumulates dw, db in its own partial row
// (zero-initialised by the caller), each column owned by one thread: no races.
template <typename Element>
__global__ void __launch_bounds__(kLayerNormThreads) layer_norm_bwd_generic_kernel(const LayerNormParams p) {
  __shared__ float scratch[kLayerNormThreads / 32];
  const Element* weight = static_cast<const Element*>(p.weight);
  float* partial_dw = p.partial + int64_t(blockIdx.x) * 2 * p.cols;
  float* partial_db = partial_dw + p.cols;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
    const Element* grad_y = static_cast<const Element*>(p.grad_y) + row * p.cols;
    const float saved_mean = p.mean[row], rstd = p.rstd[row];
    float sum_centred = 0.0f;
    for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) sum_centred += to_float(x[col]) - saved_mean;
    const float correction = row_sum<kLayerNormThreads>(sum_centred, scratch) / p.cols;
    float sum_wg = 0.0f, sum_wg_xhat = 0.0f;
    for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) {
      const float xhat = normalised(to_float(x[col]), saved_mean, correction, rstd), g = to_float(grad_y[col]);
      const float wg = to_float(weight[col]) * g;
      sum_wg += wg;
      sum_wg_xhat += wg * xhat;
      partial_dw[col] += g * xhat;
      partial_db[col] += g;
    }
    const float mean_wg = row_sum<kLayerNormThreads>(sum_wg, scratch) / p.cols;
    const float mean_wg_xhat = row_sum<kLayerNormThreads>(sum_wg_xhat, scratch) / p.cols;
    Element* grad_x = static_cast<Element*>(p.grad_x) + row * p.cols;
    for (int col = threadIdx.x; col < p.cols; col += kLayerNormThreads) {
      const float xhat = normalised(to_float(x[col]), saved_mean, correction, rstd);
      const float wg = to_float(weight[col]) * to_float(grad_y[col]);
      grad_x[col] = from_float<Element>(rstd * (wg - mean_wg - xhat * mean_wg_xhat));
    }
  }
}

// dw[c] = Σ_b partial[b, 0, c], db[c] = Σ_b partial[b, 1, c]: one thread per column,
// consecutive threads on consecutive columns (coalesced).
template <typename Element>
__global__ void __launch_bounds__(kLayerNormThreads) layer_norm_bwd_reduce_kernel(const LayerNormParams p) {
  const int col = blockIdx.x * kLayerNormThreads + threadIdx.x;
  if (col >= p.cols) return;
  const float dw = partial_column_sum(p.partial, p.partial_rows, 2, 0, p.cols, col);
  const float db = partial_column_sum(p.partial, p.partial_rows, 2, 1, p.cols, col);
  static_cast<Element*>(p.grad_weight)[col] = from_float<Element>(dw);
  static_cast<Element*>(p.grad_bias)[col] = from_float<Element>(db);
}

// ---------------------------------------------------------------------------------
// Launchers (host).

// Which kernel shape serves a row of `cols` elements (see the top of this file).
template <typename Element>
RowShape row_shape(const LayerNormParams& p) {
  const bool aligned = aligned_16(p.x) && aligned_16(p.weight) && (p.bias == nullptr || aligned_16(p.bias)) &&
                       (p.grad_y == nullptr || aligned_16(p.grad_y)) && (p.y == nullptr || aligned_16(p.y)) &&
                       (p.grad_x == nullptr || aligned_16(p.grad_x));
  return row_shape_for<Element>(p.cols, aligned);
}

template <typename Element>
void launch_layer_norm_fwd(const LayerNormParams& p, cudaStream_t stream) {
  switch (row_shape<Element>(p)) {
    case RowShape::kWarp: {
      constexpr int kRowsPerBlock = kLayerNormThreads / 32;
      const dim3 blocks = launch_grid("the layer norm forward (blocks of warp rows)",
                                      (int64_t(p.rows) + kRowsPerBlock - 1) / kRowsPerBlock);
      launch_kernel(layer_norm_fwd_vector_kernel<Element, 32>, blocks, kLayerNormThreads, 0, stream, p);
      break;
    }
    case RowShape::kBlock:
      launch_kernel(layer_norm_fwd_vector_kernel<Element, kLayerNormThreads>,
                    launch_grid("the layer norm forward (rows)", p.rows), kLayerNormThreads, 0, stream, p);
      break;
    case RowShape::kGeneric:
      launch_kernel(layer_norm_fwd_generic_kernel<Element>, launch_grid("the layer norm forward (rows)", p.rows),
                    kLayerNormThreads, 0, stream, p);
      break;
  }
}

// p.partial must hold p.partial_rows rows, zeros when row_shape is kGeneric; one block
// per partial row.
template <typename Element>
void launch_layer_norm_bwd(const LayerNormParams& p, cudaStream_t stream) {
  const auto blocks = unsigned(p.partial_rows);
  switch (row_shape<Element>(p)) {
    case RowShape::kWarp:
      launch_kernel(layer_norm_bwd_vector_kernel<Element, 32>, blocks, kLayerNormThreads, 0, stream, p);
      break;
    case RowShape::kBlock:
      launch_kernel(layer_norm_bwd_vector_kernel<Element, kLayerNormThreads>, blocks, kLayerNormThreads, 0, stream,
                    p);
      break;
    case RowShape::kGeneric:
      launch_kernel(layer_norm_bwd_generic_kernel<Element>, blocks, kLayerNormThreads, 0, stream, p);
      break;
  }
  const auto column_blocks = unsigned((p.cols + kLayerNormThreads - 1) / kLayerNormThreads);
  launch_kernel(layer_norm_bwd_reduce_kernel<Element>, column_blocks, kLayerNormThreads, 0, stream, p);
}

}  // namespace fastgpt::cuda
