// Python bindings of the attention domain: attention_forward, qkv_prep, attention_tile_shape,
// attention_head_dim_supported.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kernels/attention_tiles.cuh"
#include "ops/attention.h"
#include "ops/registry.h"

namespace py = pybind11;

namespace dgemma {

std::pair<int, int> attention_tile_shape(int64_t head_dim, int64_t impl) {
  if (impl != kAttentionMmaSync && !attention_is_wgmma(impl))
    throw std::invalid_argument("attention impl " + std::to_string(impl) + " is not an implementation (expected " +
                                std::to_string(kAttentionMmaSync) + " mma.sync, " + std::to_string(kAttentionWgmma) +
                                " wgmma or " + std::to_string(kAttentionWgmmaDeep) + " wgmma_deep)");
  if (head_dim > (1 << 20) || !kernels::attention_head_dim_supported(static_cast<int>(head_dim)))
    throw std::invalid_argument("attention head_dim " + std::to_string(head_dim) +
                                " is not supported (expected 256 or 512)");
  const int d = static_cast<int>(head_dim);
  if (impl == kAttentionWgmma) return {kernels::attention_wgmma_block_m(d), kernels::attention_wgmma_block_n(d)};
  if (impl == kAttentionWgmmaDeep)
    return {kernels::attention_wgmma_block_m(d), kernels::attention_wgmma_deep_block_n(d)};
  return {kernels::attention_block_m(d), kernels::attention_block_n(d)};
}

namespace {

#ifdef DGEMMA_WITH_CUDA
void attention_forward_py(py::handle q, py::handle cache_k, py::handle cache_v, py::handle tail_k, py::handle tail_v,
                          py::handle prefix_lens, py::handle valid, py::handle out, py::handle part_o,
                          py::handle part_lse, py::handle split_counters, int64_t max_prefix, int64_t ring_size,
                          int64_t window, bool causal, bool valid_tail, int64_t num_splits, int64_t split_tiles,
                          std::uintptr_t stream, int64_t impl) {
  TensorArg valid_a, part_o_a, part_lse_a, counters_a;
  AttentionOptions opt;
  opt.max_prefix = max_prefix;
  opt.ring_size = ring_size;
  opt.window = window;
  opt.causal = causal;
  opt.valid_tail = valid_tail;
  opt.num_splits = num_splits;
  opt.split_tiles = split_tiles;
  opt.impl = impl;
  attention_forward(to_arg(q, "q"), to_arg(cache_k, "cache_k"), to_arg(cache_v, "cache_v"), to_arg(tail_k, "tail_k"),
                    to_arg(tail_v, "tail_v"), to_arg(prefix_lens, "prefix_lens"),
                    optional_arg(valid, "valid", valid_a), to_arg(out, "out"),
                    optional_arg(part_o, "part_o", part_o_a), optional_arg(part_lse, "part_lse", part_lse_a),
                    optional_arg(split_counters, "split_counters", counters_a), opt, stream);
}

void qkv_prep_py(py::handle q_in, py::handle k_in, py::handle v_in, py::handle q_weight, py::handle k_weight,
                 py::handle cos, py::handle sin, py::handle q_out, py::handle k_out, py::handle v_out,
                 py::handle cache_k, py::handle cache_v, int64_t cache_start, int64_t ring_size, double eps,
                 std::uintptr_t stream) {
  TensorArg v_in_a, cache_k_a, cache_v_a;
  qkv_prep(to_arg(q_in, "q_in"), to_arg(k_in, "k_in"), optional_arg(v_in, "v_in", v_in_a),
           to_arg(q_weight, "q_weight"), to_arg(k_weight, "k_weight"), to_arg(cos, "cos"), to_arg(sin, "sin"),
           to_arg(q_out, "q_out"), to_arg(k_out, "k_out"), to_arg(v_out, "v_out"),
           optional_arg(cache_k, "cache_k", cache_k_a), optional_arg(cache_v, "cache_v", cache_v_a), cache_start,
           ring_size, eps, stream);
}
#else
void attention_forward_py(py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                          py::handle, py::handle, py::handle, py::handle, int64_t, int64_t, int64_t, bool, bool, int64_t,
                          int64_t, std::uintptr_t, int64_t) {
  cuda_unavailable("attention_forward");
}

void qkv_prep_py(py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
                 py::handle, py::handle, py::handle, py::handle, int64_t, int64_t, double, std::uintptr_t) {
  cuda_unavailable("qkv_prep");
}
#endif

}  // namespace

void register_attention(py::module_& m) {
  m.def(
      "attention_tile_shape",
      [](int64_t head_dim, int64_t impl) {
        auto [bm, bn] = attention_tile_shape(head_dim, impl);
        return py::make_tuple(bm, bn);
      },
      py::arg("head_dim"), py::arg("impl") = kAttentionMmaSync,
      "(block_m, block_n) of the attention kernel impl (0 mma.sync, 1 wgmma) for a head dim (256 or 512; wgmma: "
      "block_m counts the packed query rows of a KV group).");
  m.def(
      "attention_head_dim_supported",
      [](int64_t head_dim) {
        return head_dim > 0 && head_dim <= (1 << 20) && kernels::attention_head_dim_supported(static_cast<int>(head_dim));
      },
      py::arg("head_dim"), "Whether the attention and qkv_prep kernels take this head dim.");
  m.def("attention_forward", &attention_forward_py, py::arg("q"), py::arg("cache_k"), py::arg("cache_v"),
        py::arg("tail_k"), py::arg("tail_v"), py::arg("prefix_lens"), py::arg("valid"), py::arg("out"),
        py::arg("part_o"), py::arg("part_lse"), py::arg("split_counters"), py::arg("max_prefix"),
        py::arg("ring_size"), py::arg("window"),
        py::arg("causal"), py::arg("valid_tail"), py::arg("num_splits"), py::arg("split_tiles"), py::arg("stream"),
        py::arg("impl") = kAttentionMmaSync,
        "Attention of q over [visible cached prefix ; tail] by kernel impl (0 mma.sync, 1 wgmma); see "
        "dgemma.ops.cuda_attention.");
  m.def("qkv_prep", &qkv_prep_py, py::arg("q_in"), py::arg("k_in"), py::arg("v_in"), py::arg("q_weight"),
        py::arg("k_weight"), py::arg("cos"), py::arg("sin"), py::arg("q_out"), py::arg("k_out"), py::arg("v_out"),
        py::arg("cache_k"), py::arg("cache_v"), py::arg("cache_start"), py::arg("ring_size"), py::arg("eps"),
        py::arg("stream"), "Fused q/k norms, RoPE, v_norm and cache write; see dgemma.ops.cuda_attention.");
}

}  // namespace dgemma
