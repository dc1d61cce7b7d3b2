// Launchers of the moe domain: the router, the device-side dispatch plan, the FP8 MoE layer and the
// FP8 dense linear / gated MLP. Every function validates its arguments (std::invalid_argument naming
// the argument) and enqueues work on `stream` without synchronising.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/moe_plan_limits.h"
#include "ops/tensor_arg.h"

namespace dgemma {

// Router. x [tokens, hidden] bf16 (rows may be strided); scale [hidden], proj [experts, hidden],
// expert_scale [experts] bf16. Writes weights [tokens, top_k] fp32 and ids [tokens, top_k] int32.
// With residual_y [tokens, hidden] and residual_w [hidden] bf16 (x contiguous), the router first forms the layer's
// attention residual residual_out = x + rms_norm(residual_y) * residual_w (rounded as the residual_norm kernel's
// add form, same eps), stores it, and routes it.
void moe_route(const TensorArg& x, const TensorArg& scale, const TensorArg& proj, const TensorArg& expert_scale,
               int top_k, double eps, const TensorArg& weights, const TensorArg& ids, std::uintptr_t stream,
               const TensorArg* residual_y = nullptr, const TensorArg* residual_w = nullptr,
               const TensorArg* residual_out = nullptr);

// Dispatch plan of ids [tokens, top_k] int32: offsets [experts + 1], row_of [tokens, top_k] and
// row_expert [tokens * top_k], all int32 (see kernels/moe_dispatch.cuh for the order).
// With pad > 1 each expert's rows are padded to a multiple of pad (kernels/moe_dispatch.cuh): row_expert and row_src
// [tokens * top_k + experts * (pad - 1)], tile_expert [ceil(that / pad)] and num_tiles [1] are then written too.
// scratch (int32, at least experts * ceil(tokens * top_k / 1024) entries, optional): large inputs then run the plan
// on every SM (three launches) instead of one block; the rows are the same.
void moe_plan(const TensorArg& ids, int experts, const TensorArg& offsets, const TensorArg& row_of,
              const TensorArg& row_expert, std::uintptr_t stream, int pad = 1, const TensorArg* row_src = nullptr,
              const TensorArg* tile_expert = nullptr, const TensorArg* num_tiles = nullptr,
              const TensorArg* scratch = nullptr);

// Bytes of the uint8 workspace moe_fp8 needs for these sizes on `device`.
size_t moe_fp8_workspace_bytes(int64_t tokens, int top_k, int hidden, int inter, int experts, int device,
                               bool contiguous = true);

// Routed experts in FP8: out [tokens, hidden] bf16 = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]).
// x [tokens, hidden] bf16; ids [tokens, top_k] int32; weights [tokens, top_k] fp32;
// gate_up_q [experts, 2 * inter, hidden] float8_e4m3fn + gate_up_scale [experts, 2 * inter] fp32 (gate rows
// first); down_q [experts, hidden, inter] + down_scale [experts, hidden]; workspace uint8 of at least
// moe_fp8_workspace_bytes(..., contiguous). Activations are quantised per token inside the pipeline.
// contiguous: one persistent GEMM per projection over a tile-padded expert-sorted layout (default); false: CUTLASS's
// pointer-array grouped GEMM (kept for comparison and triage).
// norm (bf16 [hidden], optional): the experts see rms_norm(x) * norm (epsilon eps) instead of x, normed inside the
// gather, bit-identical to rms_norm first.
// shared (contiguous only): the last `shared` experts of the stacks are shared experts (e.g. a dense MLP cut into
// expert-sized pieces): every token visits each with weight 1 after its routed slots (ids name only the other
// experts), their sum goes to shared_out [tokens, hidden] bf16, and with norm they see rms_norm(x) * shared_norm.
// The workspace is then moe_fp8_workspace_bytes(tokens, top_k + shared, ..., experts (all), ...).
// At most kernels::kMaxSharedExperts shared experts (kernels/moe_plan_limits.h).
// combine = false (contiguous only; out and shared_out then null): the pipeline stops before its combine and leaves
// each (token, slot) row's scaled, weighted output in the workspace, where moe_fp8_workspace_layout says (read by
// ffn_residual_experts, ops/norm.h).
void moe_fp8(const TensorArg& x, const TensorArg& ids, const TensorArg& weights, const TensorArg& gate_up_q,
             const TensorArg& gate_up_scale, const TensorArg& down_q, const TensorArg& down_scale, const TensorArg* out,
             const TensorArg& workspace, std::uintptr_t stream, bool contiguous = true, const TensorArg* norm = nullptr,
             double eps = 1e-6, int shared = 0, const TensorArg* shared_norm = nullptr,
             const TensorArg* shared_out = nullptr, bool combine = true);

// Where the contiguous pipeline (slots = top_k + shared per token) leaves its rows in the workspace: the down
// projection's rows [rows, hidden] bf16 at byte offset down_offset, row_of [tokens, slots] int32 at row_of_offset.
struct MoeWorkspaceLayout {
  int64_t down_offset;
  int64_t rows;
  int64_t row_of_offset;
};
MoeWorkspaceLayout moe_fp8_workspace_layout(int64_t tokens, int slots, int hidden, int inter, int experts, int device);

// Per-row FP8 quantisation: x [rows, cols] bf16 -> q [rows, cols] float8_e4m3fn, scale [rows] fp32.
void fp8_quantize_rows(const TensorArg& x, const TensorArg& q, const TensorArg& scale, std::uintptr_t stream);

size_t fp8_linear_workspace_bytes(int64_t rows, int n_out, int k, int device);

// out [rows, n_out] bf16 = x [rows, k] . dequant(w_q [n_out, k], w_scale [n_out])^T: x bf16 is quantised per
// row here; x float8_e4m3fn (contiguous) arrives quantised with x_scale [rows] fp32 (e.g. from rms_norm_fp8).
void fp8_linear(const TensorArg& x, const TensorArg* x_scale, const TensorArg& w_q, const TensorArg& w_scale,
                const TensorArg& out, const TensorArg& workspace, std::uintptr_t stream);

size_t fp8_gated_mlp_workspace_bytes(int64_t rows, int hidden, int inter, int device);

// out [rows, hidden] = down(gelu_tanh(gate(x)) * up(x)) with FP8 weights (q [n, k] + scale [n] each); x as in
// fp8_linear. gate/up run as one GEMM when up's rows and scales directly follow gate's in memory.
void fp8_gated_mlp(const TensorArg& x, const TensorArg* x_scale, const TensorArg& gate_q, const TensorArg& gate_scale, const TensorArg& up_q,
                   const TensorArg& up_scale, const TensorArg& down_q, const TensorArg& down_scale,
                   const TensorArg& out, const TensorArg& workspace, std::uintptr_t stream);

}  // namespace dgemma
