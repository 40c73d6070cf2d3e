// The CUDA kernels of csrc/cuda run on the CPU (cuda_shim.h, ptx_emulation.h), through
// their real launchers, on CPU tensors: tests/test_cuda.py builds this file with
// torch.utils.cpp_extension.load and compares the results with fastgpt/reference.py, so
// the kernels' index math, masking, pipelines and fragment bookkeeping are tested on
// machines without a GPU. Timing, real concurrency and the hardware itself are not: those
// need tools/gpu_check.sh on a GPU.
//
// The attention entry points take the op's window / softcap (0 = none) like fastgpt::attention_*;
// every entry point takes `reverse_order` (fiber scheduling order) and `copy_at_wait`
// (cp.async data lands at the wait instead of at issue) to shake out ordering bugs.
// attention_fwd takes attention.cu's dispatch (attention_decode_host.h): Tq <= kDecodeMaxQueries
// runs the split-KV decode kernels, split for kEmulatedSmCount SMs; attention_decode_fwd forces
// them, with a chosen chunk size, so that small Tk still spans several chunks.
#include <torch/extension.h>

#include "cuda/emulator/cuda_shim.h"
// The kernels, compiled for the host against the shim:
#include "cuda/attention_bwd.cuh"
#include "cuda/attention_decode.cuh"
#include "cuda/attention_fwd.cuh"
#include "cuda/layer_norm.cuh"
#include "cuda/rms_norm.cuh"
#include "cuda/host.h"
#include "cuda/attention_decode_host.h"

namespace fastgpt::cuda {
namespace {

// The SM count the emulated forward plans its decode split for (an H100 / H200's).
constexpr int kEmulatedSmCount = 132;

void configure_ranges(bool reverse_order, bool copy_at_wait, const std::vector<const at::Tensor*>& inputs) {
  auto& rt = fastgpt_emu::runtime();
  rt.reverse_order = reverse_order;
  rt.copy_at_wait = copy_at_wait;
  rt.global_ranges.clear();
  for (const at::Tensor* t : inputs) {
    int64_t last = 0;
    for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
    rt.global_ranges.push_back({t->data_ptr(), size_t(last + 1) * t->element_size()});
  }
}

void configure(bool reverse_order, bool copy_at_wait, std::initializer_list<const at::Tensor*> inputs) {
  configure_ranges(reverse_order, copy_at_wait, std::vector<const at::Tensor*>(inputs));
}

// As attention.cu: last dim contiguous (CPU allocations are aligned enough).
at::Tensor kernel_layout(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The forward with attention.cu's choice of kernel; `decode_chunk` >= 0 forces the decode kernels
// (0: the planned split, > 0: chunks of that many keys). Returns out, lse and the number of key
// chunks the decode ran (0: the prefill kernel ran).
std::tuple<at::Tensor, at::Tensor, int64_t> run_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const std::optional<at::Tensor>& mask_in, bool causal,
                                                        double scale, double dropout_p, int64_t seed, int64_t window,
                                                        double softcap, bool reverse_order, bool copy_at_wait,
                                                        int64_t decode_chunk) {
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  std::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const AttentionLauncher prefill = pick_attention_launcher(true, q.scalar_type(), q.size(3));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  configure(reverse_order, copy_at_wait, {&q, &k, &v});
  AttentionParams p = make_attention_params(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  int64_t splits = 0;
  if (decode_chunk >= 0 || is_decode(q.size(2))) {
    splits = run_attention_decode(p, q.scalar_type(), q.options(), kEmulatedSmCount, nullptr,
                                  int(decode_chunk > 0 ? decode_chunk : 0), NAN)
                 .num_splits;
  } else {
    prefill(p, nullptr);
  }
  return {out, lse, splits};
}

std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& mask, bool causal, double scale,
                                      double dropout_p, int64_t seed, int64_t window, double softcap, bool reverse_order,
                                      bool copy_at_wait) {
  auto [out, lse, splits] = run_forward(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap, reverse_order,
                                        copy_at_wait, /*decode_chunk=*/-1);
  return {out, lse};
}

// The decode kernels whatever Tq: (out, lse, number of key chunks); chunk 0 = the planned split.
std::tuple<at::Tensor, at::Tensor, int64_t> attention_decode_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask, bool causal,
    double scale, double dropout_p, int64_t seed, int64_t window, double softcap, int64_t chunk, bool reverse_order,
    bool copy_at_wait) {
  TORCH_CHECK(chunk >= 0, "attention_decode_fwd: chunk must be >= 0, got ", chunk);
  return run_forward(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap, reverse_order, copy_at_wait,
                     chunk);
}

// The split the emulated forward plans for a call shape (num_splits, chunk, row_blocks).
std::vector<int64_t> attention_decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t Tk, bool causal,
                                           int64_t window, int64_t sm_count) {
  AttentionParams p{};
  p.batch = int(B), p.heads = int(Hq), p.kv_heads = int(Hkv), p.kv_group = int(Hq / Hkv);
  p.q_len = int(Tq), p.k_len = int(Tk), p.causal = causal, p.window = int(window);
  const DecodeSplits s = plan_attention_decode(p, int(sm_count));
  return {s.num_splits, s.chunk, s.row_blocks};
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                      const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
                                      const std::optional<at::Tensor>& mask_in, bool causal, double scale,
                                      double dropout_p, int64_t seed, int64_t window, double softcap, bool reverse_order,
                                      bool copy_at_wait,
                                      const std::optional<at::Tensor>& grad_lse_in) {
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor grad_out = kernel_layout(grad_out_in), out = contiguous_aligned(out_in),
                   lse = lse_in.contiguous();
  std::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::Tensor grad_q_accum = at::zeros({B, H, Tq, D}, q.options().dtype(at::kFloat));
  at::Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  configure(reverse_order, copy_at_wait, {&q, &k, &v, &grad_out});
  AttentionParams p = make_attention_params(q, k, v, mask, causal, scale, dropout_p, seed, window, softcap);
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->contiguous();
  set_attention_backward_params(p, grad_out, out, lse, grad_lse, delta, grad_q_accum, grad_q, grad_k, grad_v);
  pick_attention_launcher(false, q.scalar_type(), q.size(3))(p, nullptr);
  return {grad_q, grad_k, grad_v};
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       double eps, bool reverse_order, bool copy_at_wait) {
  configure(reverse_order, copy_at_wait, {&x, &weight, &bias});
  auto [y, mean, rstd] = run_layer_norm_fwd(x, weight, bias, eps, nullptr);
  return {y, mean, rstd};
}

// `blocks`: the backward's grid (layer_norm.cu uses two per SM), small here so that
// every block walks several rows. Scratch the kernels must overwrite starts as NaN: it shows if they do not.
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd, int64_t blocks,
                                       bool reverse_order, bool copy_at_wait) {
  configure(reverse_order, copy_at_wait, {&x, &grad_y, &weight});
  auto [grad_x, grad_weight, grad_bias] = run_layer_norm_bwd(grad_y, x, weight, mean, rstd, blocks, nullptr, NAN);
  return {grad_x, grad_weight, grad_bias};
}

// RMSNorm: residual None = rms_norm_fwd (sum comes back undefined, None in Python).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, double eps, double offset,
                                     bool reverse_order, bool copy_at_wait) {
  std::vector<const at::Tensor*> inputs{&x};
  if (residual.has_value()) inputs.push_back(&*residual);
  if (weight.has_value()) inputs.push_back(&*weight);
  configure_ranges(reverse_order, copy_at_wait, inputs);
  auto [y, sum, rstd] = run_rms_norm_fwd(x, residual, weight, eps, offset, nullptr);
  return {y, sum, rstd};
}

// `blocks` and the NaN scratch as layer_norm_bwd's.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd, double offset,
                                     int64_t blocks, bool reverse_order, bool copy_at_wait) {
  std::vector<const at::Tensor*> inputs{&x, &grad_y};
  if (weight.has_value()) inputs.push_back(&*weight);
  configure_ranges(reverse_order, copy_at_wait, inputs);
  auto [grad_x, grad_weight] = run_rms_norm_bwd(grad_y, x, weight, rstd, offset, blocks, nullptr, NAN);
  return {grad_x, grad_weight};
}

// The head dims attention.h compiles (tests/test_cuda.py compares them with fastgpt/backends.py).
std::vector<int64_t> attention_head_dims() {
  return std::vector<int64_t>(std::begin(kAttentionHeadDims), std::end(kAttentionHeadDims));
}

// attention.h's kDecodeMaxQueries (tests/test_cuda.py compares it with fastgpt/backends.py).
int64_t decode_max_queries() { return kDecodeMaxQueries; }

// The launchers' grid check (ptx.cuh): the (x, y, z) of the dim3, or its error.
std::vector<int64_t> launch_grid_of(int64_t x, int64_t y, int64_t z) {
  const dim3 grid = launch_grid("a test grid", x, y, z);
  return {grid.x, grid.y, grid.z};
}

// ---- fragment maps (ptx_emulation.h), for tests/test_cuda.py to check against CuTe's layouts

// Every entry of the emulator's maps: "mma_a", "mma_b" rows (lane, register, half, row, col), "mma_c"
// (lane, register, row, col), "ldmatrix" and "ldmatrix_trans" (lane, register, half, block, row, col).
std::map<std::string, std::vector<std::vector<int64_t>>> fragment_maps() {
  std::map<std::string, std::vector<std::vector<int64_t>>> maps;
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      const emulation::Element2 c = emulation::mma_c_element(lane, reg);
      maps["mma_c"].push_back({lane, reg, c.row, c.col});
      for (int half = 0; half < 2; ++half) {
        const emulation::Element2 a = emulation::mma_a_element(lane, reg, half);
        maps["mma_a"].push_back({lane, reg, half, a.row, a.col});
        if (reg < 2) {
          const emulation::Element2 b = emulation::mma_b_element(lane, reg, half);
          maps["mma_b"].push_back({lane, reg, half, b.row, b.col});
        }
        for (const bool transpose : {false, true}) {
          const emulation::BlockElement e = emulation::ldmatrix_element(transpose, lane, reg, half);
          maps[transpose ? "ldmatrix_trans" : "ldmatrix"].push_back({lane, reg, half, e.block, e.row, e.col});
        }
      }
    }
  }
  return maps;
}

// One warp's mma.m16n8k16 (float16 or bfloat16 inputs, float32 accumulators) on the emulator: a (32, 4),
// b (32, 2) int64 registers (32-bit patterns), c (32, 4) float32 -> d (32, 4) float32, per lane.
at::Tensor run_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bfloat16) {
  at::Tensor d = at::empty({32, 4}, c.options());
  const auto a_ = a.accessor<int64_t, 2>(), b_ = b.accessor<int64_t, 2>();
  const auto c_ = c.accessor<float, 2>();
  auto d_ = d.accessor<float, 2>();
  fastgpt_emu::launch(dim3(1), dim3(32), 0, [&] {
    const int lane = int(threadIdx.x);
    uint32_t fragment[4];
    float acc[4];
    for (int r = 0; r < 4; ++r) fragment[r] = uint32_t(a_[lane][r]), acc[r] = c_[lane][r];
    if (bfloat16) {
      mma_16816<__nv_bfloat16>(acc, fragment, uint32_t(b_[lane][0]), uint32_t(b_[lane][1]));
    } else {
      mma_16816<__half>(acc, fragment, uint32_t(b_[lane][0]), uint32_t(b_[lane][1]));
    }
    for (int r = 0; r < 4; ++r) d_[lane][r] = acc[r];
  });
  return d;
}

// One warp's ldmatrix .x4 (.trans) on the emulator: rows (32, 8) int64 16-bit patterns, row l of
// shared memory (block l / 8, row l % 8) pointed to by lane l -> (32, 4) int64 registers per lane.
at::Tensor run_ldmatrix(const at::Tensor& rows, bool transpose) {
  at::Tensor out = at::empty({32, 4}, rows.options());
  const auto rows_ = rows.accessor<int64_t, 2>();
  auto out_ = out.accessor<int64_t, 2>();
  fastgpt_emu::launch(dim3(1), dim3(32), 32 * 16, [&] {
    const int lane = int(threadIdx.x);
    auto* row = reinterpret_cast<uint16_t*>(dynamic_smem() + 16 * lane);
    for (int col = 0; col < 8; ++col) row[col] = uint16_t(rows_[lane][col]);
    __syncthreads();
    uint32_t r[4];
    if (transpose) {
      ldmatrix_x4_trans(r, row);
    } else {
      ldmatrix_x4(r, row);
    }
    for (int i = 0; i < 4; ++i) out_[lane][i] = r[i];
  });
  return out;
}

// Sets the most dynamic shared memory a block of the emulated device may opt in to (an sm_90
// block's 227 KiB unless a test lowers it); returns the previous limit.
int64_t set_shared_memory_limit(int64_t bytes) {
  auto& rt = fastgpt_emu::runtime();
  const int64_t previous = int64_t(rt.max_shared_memory_per_block);
  rt.max_shared_memory_per_block = size_t(bytes);
  return previous;
}

}  // namespace
}  // namespace fastgpt::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd", &fastgpt::cuda::attention_fwd);
  namespace py = pybind11;
  m.def("attention_bwd", &fastgpt::cuda::attention_bwd, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("window"), py::arg("softcap"), py::arg("reverse_order"),
        py::arg("copy_at_wait"), py::arg("grad_lse") = py::none());
  m.def("attention_decode_fwd", &fastgpt::cuda::attention_decode_fwd);
  m.def("attention_decode_plan", &fastgpt::cuda::attention_decode_plan);
  m.def("decode_max_queries", &fastgpt::cuda::decode_max_queries);
  m.def("launch_grid", &fastgpt::cuda::launch_grid_of);
  m.def("fragment_maps", &fastgpt::cuda::fragment_maps);
  m.def("run_mma", &fastgpt::cuda::run_mma);
  m.def("run_ldmatrix", &fastgpt::cuda::run_ldmatrix);
  m.def("set_shared_memory_limit", &fastgpt::cuda::set_shared_memory_limit);
  m.def("layer_norm_fwd", &fastgpt::cuda::layer_norm_fwd);
  m.def("layer_norm_bwd", &fastgpt::cuda::layer_norm_bwd);
  m.def("rms_norm_fwd", &fastgpt::cuda::rms_norm_fwd);
  m.def("rms_norm_bwd", &fastgpt::cuda::rms_norm_bwd);
  m.def("attention_head_dims", &fastgpt::cuda::attention_head_dims);
}
