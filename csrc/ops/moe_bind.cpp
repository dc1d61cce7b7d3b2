// Python bindings of the moe domain: router, dispatch plan, FP8 MoE layer, FP8 linear and gated MLP.
// Without CUDA the same names exist and raise, so the Python API is identical in both builds.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/moe_plan_limits.h"
#include "kernels/moe_route_limits.h"
#include "ops/registry.h"

#ifdef DGEMMA_WITH_CUDA
#include "ops/moe.h"
#endif

namespace py = pybind11;

namespace dgemma {

namespace {

// Host-only queries: available in every build (the ops ask them before choosing a kernel).
void register_moe_limits(py::module_& m) {
  m.def("moe_route_unsupported", &kernels::route_unsupported, py::arg("experts"), py::arg("top_k"),
        py::arg("hidden"), "Why the router kernel cannot run these sizes, or '' when it can.");
  m.def("moe_shared_experts_unsupported", &kernels::shared_experts_unsupported, py::arg("experts"),
        py::arg("shared"), "Why an expert stack of `experts` with the last `shared` shared cannot run, or ''.");
  m.def("moe_plan_scratch_ints", &kernels::moe_plan_scratch_ints, py::arg("entries"), py::arg("experts"),
        "int32 scratch entries of the multi-block dispatch plan (moe_plan's scratch) for these sizes.");
  m.def("moe_gemm_tile", &kernels::choose_moe_gemm_tile, py::arg("routed_rows"), py::arg("experts"),
        "The contiguous expert GEMM's token tile for these sizes (each expert's rows are padded to it), unless "
        "DGEMMA_MOE_TILE overrides it.");
}

}  // namespace

#ifdef DGEMMA_WITH_CUDA

void register_moe(py::module_& m) {
  register_moe_limits(m);
  m.def(
      "moe_route",
      [](py::handle x, py::handle scale, py::handle proj, py::handle expert_scale, int top_k, double eps,
         py::handle weights, py::handle ids, std::uintptr_t stream, py::handle residual_y, py::handle residual_w,
         py::handle residual_out) {
        TensorArg y_slot, w_slot, out_slot;
        moe_route(to_arg(x, "x"), to_arg(scale, "scale"), to_arg(proj, "proj"), to_arg(expert_scale, "expert_scale"),
                  top_k, eps, to_arg(weights, "weights"), to_arg(ids, "ids"), stream,
                  optional_arg(residual_y, "residual_y", y_slot), optional_arg(residual_w, "residual_w", w_slot),
                  optional_arg(residual_out, "residual_out", out_slot));
      },
      py::arg("x"), py::arg("scale"), py::arg("proj"), py::arg("expert_scale"), py::arg("top_k"), py::arg("eps"),
      py::arg("weights"), py::arg("ids"), py::arg("stream"), py::arg("residual_y") = py::none(),
      py::arg("residual_w") = py::none(), py::arg("residual_out") = py::none(),
      "The MoE router; with residual_y/residual_w/residual_out it first forms and stores the attention residual "
      "x + rms_norm(residual_y) * residual_w and routes that.");
  m.def(
      "moe_plan",
      [](py::handle ids, int experts, py::handle offsets, py::handle row_of, py::handle row_expert,
         std::uintptr_t stream, int pad, py::handle row_src, py::handle tile_expert, py::handle num_tiles,
         py::handle scratch) {
        TensorArg row_src_slot, tile_expert_slot, num_tiles_slot, scratch_slot;
        moe_plan(to_arg(ids, "ids"), experts, to_arg(offsets, "offsets"), to_arg(row_of, "row_of"),
                 to_arg(row_expert, "row_expert"), stream, pad, optional_arg(row_src, "row_src", row_src_slot),
                 optional_arg(tile_expert, "tile_expert", tile_expert_slot),
                 optional_arg(num_tiles, "num_tiles", num_tiles_slot), optional_arg(scratch, "scratch", scratch_slot));
      },
      py::arg("ids"), py::arg("experts"), py::arg("offsets"), py::arg("row_of"), py::arg("row_expert"),
      py::arg("stream"), py::arg("pad") = 1, py::arg("row_src") = py::none(), py::arg("tile_expert") = py::none(),
      py::arg("num_tiles") = py::none(), py::arg("scratch") = py::none(),
      "The MoE dispatch plan (kernels/moe_dispatch.cuh); pad > 1 pads each expert's rows to whole tiles and also "
      "writes row_src, tile_expert and num_tiles; with scratch, large inputs are planned on every SM.");
  m.def("moe_fp8_workspace_bytes", &moe_fp8_workspace_bytes, py::arg("tokens"), py::arg("top_k"), py::arg("hidden"),
        py::arg("inter"), py::arg("experts"), py::arg("device"), py::arg("contiguous") = true);
  m.def(
      "moe_fp8",
      [](py::handle x, py::handle ids, py::handle weights, py::handle gate_up_q, py::handle gate_up_scale,
         py::handle down_q, py::handle down_scale, py::handle out, py::handle workspace, std::uintptr_t stream,
         bool contiguous, py::handle norm, double eps, int shared, py::handle shared_norm, py::handle shared_out,
         bool combine) {
        TensorArg out_slot, norm_slot, shared_norm_slot, shared_out_slot;
        moe_fp8(to_arg(x, "x"), to_arg(ids, "ids"), to_arg(weights, "weights"), to_arg(gate_up_q, "gate_up.q"),
                to_arg(gate_up_scale, "gate_up.scale"), to_arg(down_q, "down.q"), to_arg(down_scale, "down.scale"),
                optional_arg(out, "out", out_slot), to_arg(workspace, "workspace"), stream, contiguous,
                optional_arg(norm, "norm", norm_slot), eps, shared,
                optional_arg(shared_norm, "shared_norm", shared_norm_slot),
                optional_arg(shared_out, "shared_out", shared_out_slot), combine);
      },
      py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("gate_up_q"), py::arg("gate_up_scale"),
      py::arg("down_q"), py::arg("down_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      py::arg("contiguous") = true, py::arg("norm") = py::none(), py::arg("eps") = 1e-6, py::arg("shared") = 0,
      py::arg("shared_norm") = py::none(), py::arg("shared_out") = py::none(), py::arg("combine") = true,
      "Routed experts in FP8. contiguous: one persistent GEMM per projection over a tile-padded layout (default); "
      "False: the pointer-array grouped GEMM. norm: the experts see rms_norm(x) * norm (fused into the gather). "
      "shared: the last `shared` experts are visited by every token (weight 1), summed into shared_out, normed "
      "with shared_norm. combine=False: stop before the combine (out, shared_out None); the rows stay in the "
      "workspace (moe_fp8_workspace_layout) for ffn_residual_experts.");
  m.def(
      "moe_fp8_workspace_layout",
      [](int64_t tokens, int slots, int hidden, int inter, int experts, int device) {
        const MoeWorkspaceLayout l = moe_fp8_workspace_layout(tokens, slots, hidden, inter, experts, device);
        return py::make_tuple(l.down_offset, l.rows, l.row_of_offset);
      },
      py::arg("tokens"), py::arg("slots"), py::arg("hidden"), py::arg("inter"), py::arg("experts"), py::arg("device"),
      "(down byte offset, rows, row_of byte offset) of the contiguous pipeline's rows in its workspace.");
  m.def(
      "fp8_quantize_rows",
      [](py::handle x, py::handle q, py::handle scale, std::uintptr_t stream) {
        fp8_quantize_rows(to_arg(x, "x"), to_arg(q, "q"), to_arg(scale, "scale"), stream);
      },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("stream"));
  m.def("fp8_linear_workspace_bytes", &fp8_linear_workspace_bytes, py::arg("rows"), py::arg("n_out"), py::arg("k"),
        py::arg("device"));
  m.def(
      "fp8_linear",
      [](py::handle x, py::handle w_q, py::handle w_scale, py::handle out, py::handle workspace,
         std::uintptr_t stream, py::handle x_scale) {
        TensorArg x_scale_slot;
        fp8_linear(to_arg(x, "x"), optional_arg(x_scale, "x_scale", x_scale_slot), to_arg(w_q, "weight.q"),
                   to_arg(w_scale, "weight.scale"), to_arg(out, "out"), to_arg(workspace, "workspace"), stream);
      },
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      py::arg("x_scale") = py::none(),
      "out = x . dequant(w)^T in FP8 (one GEMM, scales in its epilogue): x bf16 is quantised per row, or "
      "x float8_e4m3fn arrives quantised with x_scale (fp32 [rows]).");
  m.def("fp8_gated_mlp_workspace_bytes", &fp8_gated_mlp_workspace_bytes, py::arg("rows"), py::arg("hidden"),
        py::arg("inter"), py::arg("device"));
  m.def(
      "fp8_gated_mlp",
      [](py::handle x, py::handle gate_q, py::handle gate_scale, py::handle up_q, py::handle up_scale,
         py::handle down_q, py::handle down_scale, py::handle out, py::handle workspace, std::uintptr_t stream,
         py::handle x_scale) {
        TensorArg x_scale_slot;
        fp8_gated_mlp(to_arg(x, "x"), optional_arg(x_scale, "x_scale", x_scale_slot), to_arg(gate_q, "gate.q"),
                      to_arg(gate_scale, "gate.scale"), to_arg(up_q, "up.q"), to_arg(up_scale, "up.scale"),
                      to_arg(down_q, "down.q"), to_arg(down_scale, "down.scale"), to_arg(out, "out"),
                      to_arg(workspace, "workspace"), stream);
      },
      py::arg("x"), py::arg("gate_q"), py::arg("gate_scale"), py::arg("up_q"), py::arg("up_scale"), py::arg("down_q"),
      py::arg("down_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"), py::arg("x_scale") = py::none(),
      "down(gelu_tanh(gate(x)) * up(x)) in FP8; x as in fp8_linear.");
}

#else


void register_moe(py::module_& m) {
  register_moe_limits(m);
  m.def(
      "moe_route",
      [](py::handle, py::handle, py::handle, py::handle, int, double, py::handle, py::handle, std::uintptr_t,
         py::handle, py::handle, py::handle) { cuda_unavailable("moe_route"); },
      py::arg("x"), py::arg("scale"), py::arg("proj"), py::arg("expert_scale"), py::arg("top_k"), py::arg("eps"),
      py::arg("weights"), py::arg("ids"), py::arg("stream"), py::arg("residual_y") = py::none(),
      py::arg("residual_w") = py::none(), py::arg("residual_out") = py::none());
  m.def(
      "moe_plan",
      [](py::handle, int, py::handle, py::handle, py::handle, std::uintptr_t, int, py::handle, py::handle, py::handle,
         py::handle) { cuda_unavailable("moe_plan"); },
      py::arg("ids"), py::arg("experts"), py::arg("offsets"), py::arg("row_of"), py::arg("row_expert"),
      py::arg("stream"), py::arg("pad") = 1, py::arg("row_src") = py::none(), py::arg("tile_expert") = py::none(),
      py::arg("num_tiles") = py::none(), py::arg("scratch") = py::none());
  m.def(
      "moe_fp8_workspace_bytes",
      [](int64_t, int, int, int, int, int, bool) -> size_t { cuda_unavailable("moe_fp8_workspace_bytes"); },
      py::arg("tokens"), py::arg("top_k"), py::arg("hidden"), py::arg("inter"), py::arg("experts"), py::arg("device"),
      py::arg("contiguous") = true);
  m.def(
      "moe_fp8",
      [](py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
         std::uintptr_t, bool, py::handle, double, int, py::handle, py::handle, bool) { cuda_unavailable("moe_fp8"); },
      py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("gate_up_q"), py::arg("gate_up_scale"),
      py::arg("down_q"), py::arg("down_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      py::arg("contiguous") = true, py::arg("norm") = py::none(), py::arg("eps") = 1e-6, py::arg("shared") = 0,
      py::arg("shared_norm") = py::none(), py::arg("shared_out") = py::none(), py::arg("combine") = true);
  m.def(
      "moe_fp8_workspace_layout",
      [](int64_t, int, int, int, int, int) -> py::tuple { cuda_unavailable("moe_fp8_workspace_layout"); },
      py::arg("tokens"), py::arg("slots"), py::arg("hidden"), py::arg("inter"), py::arg("experts"), py::arg("device"));
  m.def(
      "fp8_quantize_rows", [](py::handle, py::handle, py::handle, std::uintptr_t) { cuda_unavailable("fp8_quantize_rows"); },
      py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("stream"));
  m.def(
      "fp8_linear_workspace_bytes", [](int64_t, int, int, int) -> size_t { cuda_unavailable("fp8_linear_workspace_bytes"); },
      py::arg("rows"), py::arg("n_out"), py::arg("k"), py::arg("device"));
  m.def(
      "fp8_linear",
      [](py::handle, py::handle, py::handle, py::handle, py::handle, std::uintptr_t, py::handle) {
        cuda_unavailable("fp8_linear");
      },
      py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      py::arg("x_scale") = py::none());
  m.def(
      "fp8_gated_mlp_workspace_bytes",
      [](int64_t, int, int, int) -> size_t { cuda_unavailable("fp8_gated_mlp_workspace_bytes"); }, py::arg("rows"),
      py::arg("hidden"), py::arg("inter"), py::arg("device"));
  m.def(
      "fp8_gated_mlp",
      [](py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle, py::handle,
         std::uintptr_t, py::handle) { cuda_unavailable("fp8_gated_mlp"); },
      py::arg("x"), py::arg("gate_q"), py::arg("gate_scale"), py::arg("up_q"), py::arg("up_scale"), py::arg("down_q"),
      py::arg("down_scale"), py::arg("out"), py::arg("workspace"), py::arg("stream"), py::arg("x_scale") = py::none());
}

#endif

}  // namespace dgemma
