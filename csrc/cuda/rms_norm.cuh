// RMSNorm over the last dim of x (N, C), and the fused residual add before it: kernels and their
// launchers (no torch here: rms_norm.cu checks arguments, host.h allocates and fills RmsNormParams).
//
// With s = offset + weight (offset 1: Gemma's 1 + weight), or s = 1 without a weight:
// Forward  y = x · rstd · s,  rstd = 1 / sqrt(mean(x²) + eps), float32 statistics (no mean to
//          subtract: Σx² is a sum of positive terms, no cancellation).
//          add_rms_norm: h = x + residual is rounded to Element and stored as `sum`; the rounded h is
//          what is normalised (as the unfused `h = x + residual; rms_norm(h)`).
// Backward with x̂ = x · rstd and g = grad_y · s:
//   dx = rstd · (g - x̂ · mean(g · x̂)),  mean(g · x̂) = rstd · Σ g·x / C
//   dw = Σ_rows grad_y · x̂   (only with a weight; offset does not enter it)
// dw is taken as layer norm's (norm_common.cuh): one partial row per block, then a second kernel
// adds the partial rows up in a fixed order (no global atomics).
// Kernel shapes (vector: warp or block rows; generic) as in layer_norm.cuh.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/norm_common.cuh"
#include "cuda/ptx.cuh"
#include "cuda/vector_io.cuh"

namespace fastgpt::cuda {

struct RmsNormParams {
  const void* x;         // (N, C) contiguous
  const void* residual;  // (N, C) contiguous, add_rms_norm forward only, else nullptr
  const void* weight;    // (C,) or nullptr (s = 1)
  const void* grad_y;    // (N, C) contiguous, backward only
  void* y;               // (N, C) forward output
  void* sum;             // (N, C) add_rms_norm forward output: x + residual
  void* grad_x;          // (N, C) backward output
  float* rstd;           // (N,) forward output, backward input
  float* partial;        // (partial_rows, C) backward scratch with a weight: per block Σ grad_y·x̂
  void* grad_weight;     // (C,) backward output with a weight
  int64_t rows;          // N
  int cols;              // C
  int partial_rows;      // blocks of the backward kernel
  float eps;
  float offset;
};

// ---------------------------------------------------------------------------------
// Vector path.
template <typename Element, int kThreadsPerRow>
__global__ void __launch_bounds__(kNormThreads) rms_norm_fwd_vector_kernel(const RmsNormParams p) {
  constexpr int kVec = kVecElems<Element>, kRowsPerBlock = kNormThreads / kThreadsPerRow;
  __shared__ float scratch[kNormThreads / 32];
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int part = threadIdx.x % kThreadsPerRow, n_vecs = p.cols / kVec;
  // Block-wide rows: every thread takes part in the reductions, so no early return.
  const bool active = row < p.rows;
  const Element* x = static_cast<const Element*>(p.x) + row * p.cols;

  float values[kNormMaxVecs][kVec];  // x, or the rounded x + residual
  float squares = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
    if (active && vec < n_vecs) {
      load_vector(x + vec * kVec, values[j]);
      if (p.residual != nullptr) {
        float r[kVec];
        load_vector(static_cast<const Element*>(p.residual) + row * p.cols + vec * kVec, r);
#pragma unroll
        for (int i = 0; i < kVec; ++i) values[j][i] = to_float(from_float<Element>(values[j][i] + r[i]));
        store_vector(static_cast<Element*>(p.sum) + row * p.cols + vec * kVec, values[j]);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) squares += values[j][i] * values[j][i];
    }
  }
  const float rstd = rsqrtf(row_sum<kThreadsPerRow>(squares, scratch) / p.cols + p.eps);
  if (!active) return;
  if (part == 0) p.rstd[row] = rstd;
  Element* y = static_cast<Element*>(p.y) + row * p.cols;
#pragma unroll
  for (int j = 0; j < kNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
    if (vec < n_vecs) {
      float out[kVec];
      if (p.weight != nullptr) {
        float w[kVec];
        load_vector(static_cast<const Element*>(p.weight) + vec * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] = (values[j][i] * rstd) * (p.offset + w[i]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] = values[j][i] * rstd;
      }
      store_vector(y + vec * kVec, out);
    }
  }
}

// Rows are strided over the grid (gridDim.x == p.partial_rows blocks); each thread keeps the dw
// shares of its columns in registers (write_block_partials adds up the warps of a block).
template <typename Element, int kThreadsPerRow>
__global__ void __launch_bounds__(kNormThreads, 2) rms_norm_bwd_vector_kernel(const RmsNormParams p) {
  constexpr int kVec = kVecElems<Element>, kRowsPerBlock = kNormThreads / kThreadsPerRow;
  __shared__ float scratch[kNormThreads / 32];
  const int part = threadIdx.x % kThreadsPerRow, n_vecs = p.cols / kVec;
  const bool has_weight = p.weight != nullptr;

  // x, g and w stay packed between the two passes over a row; the dw shares are float32.
  uint4 w_raw[kNormMaxVecs];
  float dw[1][kNormMaxVecs][kVec];
#pragma unroll
  for (int j = 0; j < kNormMaxVecs; ++j) {
    const int vec = part + j * kThreadsPerRow;
    if (has_weight && vec < n_vecs) {
      w_raw[j] = *reinterpret_cast<const uint4*>(static_cast<const Element*>(p.weight) + vec * kVec);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) dw[0][j][i] = 0.0f;
  }
  // s = offset + w, or 1 without a weight
  const auto scales = [&](int j, float (&s)[kVec]) {
    if (has_weight) {
      unpack_vector<Element>(w_raw[j], s);
#pragma unroll
      for (int i = 0; i < kVec; ++i) s[i] += p.offset;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) s[i] = 1.0f;
    }
  };

  // Every thread of a block runs the same number of iterations (block reductions).
  const int64_t row_step = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock; row0 < p.rows; row0 += row_step) {
    const int64_t row = row0 + threadIdx.x / kThreadsPerRow;
    const bool active = row < p.rows;
    const float rstd = active ? p.rstd[row] : 0.0f;
    const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
    const Element* grad_y = static_cast<const Element*>(p.grad_y) + row * p.cols;
    uint4 x_raw[kNormMaxVecs], g_raw[kNormMaxVecs];
    float sum_gx = 0.0f;
#pragma unroll
    for (int j = 0; j < kNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (active && vec < n_vecs) {
        x_raw[j] = *reinterpret_cast<const uint4*>(x + vec * kVec);
        g_raw[j] = *reinterpret_cast<const uint4*>(grad_y + vec * kVec);
        float xs[kVec], dy[kVec], s[kVec];
        unpack_vector<Element>(x_raw[j], xs);
        unpack_vector<Element>(g_raw[j], dy);
        scales(j, s);
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum_gx += dy[i] * s[i] * xs[i];
      }
    }
    const float mean_g_xhat = rstd * row_sum<kThreadsPerRow>(sum_gx, scratch) / p.cols;
    if (!active) continue;
    Element* grad_x = static_cast<Element*>(p.grad_x) + row * p.cols;
#pragma unroll
    for (int j = 0; j < kNormMaxVecs; ++j) {
      const int vec = part + j * kThreadsPerRow;
      if (vec < n_vecs) {
        float xs[kVec], dy[kVec], s[kVec], dx[kVec];
        unpack_vector<Element>(x_raw[j], xs);
        unpack_vector<Element>(g_raw[j], dy);
        scales(j, s);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float xhat = xs[i] * rstd;
          dx[i] = rstd * (dy[i] * s[i] - xhat * mean_g_xhat);
          dw[0][j][i] += dy[i] * xhat;
        }
        store_vector(grad_x + vec * kVec, dx);
      }
    }
  }
  if (has_weight) write_block_partials<kThreadsPerRow>(dw, p.partial + int64_t(blockIdx.x) * p.cols, p.cols);
}

// ---------------------------------------------------------------------------------
// Generic path: one block per row, columns strided over the threads.
template <typename Element>
__global__ void __launch_bounds__(kNormThreads) rms_norm_fwd_generic_kernel(const RmsNormParams p) {
  __shared__ float scratch[kNormThreads / 32];
  const int64_t row = blockIdx.x;
  const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
  const Element* weight = static_cast<const Element*>(p.weight);
  // What is normalised: x, or the stored sum (each thread re-reads only the columns it wrote).
  const Element* h = x;
  float squares = 0.0f;
  if (p.residual != nullptr) {
    const Element* residual = static_cast<const Element*>(p.residual) + row * p.cols;
    Element* sum = static_cast<Element*>(p.sum) + row * p.cols;
    h = sum;
    for (int col = threadIdx.x; col < p.cols; col += kNormThreads) {
      const Element rounded = from_float<Element>(to_float(x[col]) + to_float(residual[col]));
      sum[col] = rounded;
      squares += to_float(rounded) * to_float(rounded);
    }
  } else {
    for (int col = threadIdx.x; col < p.cols; col += kNormThreads) squares += to_float(x[col]) * to_float(x[col]);
  }
  const float rstd = rsqrtf(row_sum<kNormThreads>(squares, scratch) / p.cols + p.eps);
  if (threadIdx.x == 0) p.rstd[row] = rstd;
  Element* y = static_cast<Element*>(p.y) + row * p.cols;
  for (int col = threadIdx.x; col < p.cols; col += kNormThreads) {
    const float xhat = to_float(h[col]) * rstd;
    y[col] = from_float<Element>(weight != nullptr ? xhat * (p.offset + to_float(weight[col])) : xhat);
  }
}

// Rows strided over the grid; block b accumulates dw in its own partial row (zero-initialised by
// the caller), each column owned by one thread: no races.
template <typename Element>
__global__ void __launch_bounds__(kNormThreads) rms_norm_bwd_generic_kernel(const RmsNormParams p) {
  __shared__ float scratch[kNormThreads / 32];
  const Element* weight = static_cast<const Element*>(p.weight);
  float* partial_dw = weight != nullptr ? p.partial + int64_t(blockIdx.x) * p.cols : nullptr;
  const auto scale = [&](int col) { return weight != nullptr ? p.offset + to_float(weight[col]) : 1.0f; };
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const Element* x = static_cast<const Element*>(p.x) + row * p.cols;
    const Element* grad_y = static_cast<const Element*>(p.grad_y) + row * p.cols;
    const float rstd = p.rstd[row];
    float sum_gx = 0.0f;
    for (int col = threadIdx.x; col < p.cols; col += kNormThreads) {
      sum_gx += to_float(grad_y[col]) * scale(col) * to_float(x[col]);
    }
    const float mean_g_xhat = rstd * row_sum<kNormThreads>(sum_gx, scratch) / p.cols;
    Element* grad_x = static_cast<Element*>(p.grad_x) + row * p.cols;
    for (int col = threadIdx.x; col < p.cols; col += kNormThreads) {
      const float xhat = to_float(x[col]) * rstd, dy = to_float(grad_y[col]);
      grad_x[col] = from_float<Element>(rstd * (dy * scale(col) - xhat * mean_g_xhat));
      if (partial_dw != nullptr) partial_dw[col] += dy * xhat;
    }
  }
}

// dw[c] = Σ_b partial[b, c]: one thread per column, consecutive threads on consecutive columns.
template <typename Element>
__global__ void __launch_bounds__(kNormThreads) rms_norm_bwd_reduce_kernel(const RmsNormParams p) {
  const int col = blockIdx.x * kNormThreads + threadIdx.x;
  if (col >= p.cols) return;
  static_cast<Element*>(p.grad_weight)[col] = from_float<Element>(partial_column_sum(p.partial, p.partial_rows, 1, 0,
                                                                                     p.cols, col));
}

// ---------------------------------------------------------------------------------
// Launchers (host).

template <typename Element>
RowShape row_shape(const RmsNormParams& p) {
  const auto aligned_or_none = [](const void* pointer) { return pointer == nullptr || aligned_16(pointer); };
  const bool aligned = aligned_16(p.x) && aligned_or_none(p.residual) && aligned_or_none(p.weight) &&
                       aligned_or_none(p.grad_y) && aligned_or_none(p.y) && aligned_or_none(p.sum) &&
                       aligned_or_none(p.grad_x);
  return row_shape_for<Element>(p.cols, aligned);
}

template <typename Element>
void launch_rms_norm_fwd(const RmsNormParams& p, cudaStream_t stream) {
  switch (row_shape<Element>(p)) {
    case RowShape::kWarp: {
      constexpr int kRowsPerBlock = kNormThreads / 32;
      const dim3 blocks = launch_grid("the RMSNorm forward (blocks of warp rows)",
                                      (int64_t(p.rows) + kRowsPerBlock - 1) / kRowsPerBlock);
      launch_kernel(rms_norm_fwd_vector_kernel<Element, 32>, blocks, kNormThreads, 0, stream, p);
      break;
    }
    case RowShape::kBlock:
      launch_kernel(rms_norm_fwd_vector_kernel<Element, kNormThreads>,
                    launch_grid("the RMSNorm forward (rows)", p.rows), kNormThreads, 0, stream, p);
      break;
    case RowShape::kGeneric:
      launch_kernel(rms_norm_fwd_generic_kernel<Element>, launch_grid("the RMSNorm forward (rows)", p.rows),
                    kNormThreads, 0, stream, p);
      break;
  }
}

// With a weight, p.partial must hold p.partial_rows rows, zeros when row_shape is kGeneric; one
// block per partial row.
template <typename Element>
void launch_rms_norm_bwd(const RmsNormParams& p, cudaStream_t stream) {
  const auto blocks = unsigned(p.partial_rows);
  switch (row_shape<Element>(p)) {
    case RowShape::kWarp:
      launch_kernel(rms_norm_bwd_vector_kernel<Element, 32>, blocks, kNormThreads, 0, stream, p);
      break;
    case RowShape::kBlock:
      launch_kernel(rms_norm_bwd_vector_kernel<Element, kNormThreads>, blocks, kNormThreads, 0, stream, p);
      break;
    case RowShape::kGeneric:
      launch_kernel(rms_norm_bwd_generic_kernel<Element>, blocks, kNormThreads, 0, stream, p);
      break;
  }
  if (p.weight == nullptr) return;
  const auto column_blocks = unsigned((p.cols + kNormThreads - 1) / kNormThreads);
  launch_kernel(rms_norm_bwd_reduce_kernel<Element>, column_blocks, kNormThreads, 0, stream, p);
}

}  // namespace fastgpt::cuda
