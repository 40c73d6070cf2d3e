// The float32 FMA peak of this CPU at the kernels' vector level (the one loaded: FASTGPT_CPU_CAPABILITY),
// measured, not taken from a datasheet: each thread runs a loop of independent fused multiply-adds
// on Vectorized<float> registers. `fastgpt bench attention` times it in the same run as the kernels
// and reports their GFLOP/s as a share of it.
//
// kChains independent accumulators per thread hide the FMA latency: Zen 4 and recent Intel cores
// have 2 FMA pipes of 4-cycle latency, so 8 chains in flight already saturate them; 16 leave margin.
//
// Not an operator of the fastgpt contract: it lives in its own namespace, fastgpt_bench, registered
// by each CPU level library (only one is ever loaded).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace fastgpt {
namespace {

constexpr int kChains = 16;

// -> (threads, kChains * lanes) float32: the accumulators, so that nothing is optimised away.
// FLOPs done: threads * iterations * kChains * lanes * 2.
at::Tensor fma_loop(const at::Tensor& like, int64_t iterations) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(iterations >= 1, "fastgpt_bench::fma_loop: iterations must be >= 1, got ", iterations);
  const int64_t threads = at::get_num_threads();
  at::Tensor out = at::empty({threads, kChains * Vec::size()}, like.options().dtype(at::kFloat));
  float* data = out.mutable_data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Vec acc[kChains];
      for (int i = 0; i < kChains; ++i) acc[i] = Vec(1e-3f * static_cast<float>(i));
      const Vec a(0.999999f), b(1e-7f);  // a fixed point near 0.1: no overflow, no denormals
      for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
        for (int i = 0; i < kChains; ++i) acc[i] = at::vec::fmadd(acc[i], a, b);
      }
      for (int i = 0; i < kChains; ++i) acc[i].store(data + (t * kChains + i) * Vec::size());
    }
  });
  return out;
}

}  // namespace
}  // namespace fastgpt

TORCH_LIBRARY(fastgpt_bench, m) { m.def("fma_loop(Tensor like, int iterations) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastgpt_bench, CPU, m) { m.impl("fma_loop", &fastgpt::fma_loop); }
