// Launchers: router, dispatch plan and the FP8 MoE layer. Two pipelines:
//   contiguous (default): padded plan -> gather+quantise -> expert GEMM gate_up (scales in its epilogue) ->
//     gelu·up+quantise (routing weight folded into the row scale) -> expert GEMM down (scales and routing weight in
//     its epilogue) -> combine (a plain sum per token): 6 launches, one persistent kernel per GEMM for all experts.
//   pointer-array (contiguous = false): plan -> gather+quantise -> both GEMMs' arguments -> grouped GEMM gate_up ->
//     gelu·up+quantise -> grouped GEMM down -> combine (7 launches); CUTLASS's per-expert descriptors.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/fp8_epilogue.cuh"
#include "kernels/moe_dispatch.cuh"
#include "kernels/moe_route.cuh"
#include "kernels/sm90_fp8_grouped_gemm.cuh"
#include "kernels/sm90_moe_grouped_gemm.cuh"
#include "ops/moe.h"
#include "ops/moe_checks.h"

namespace dgemma {

using moe_detail::Carver;
using moe_detail::check_aligned;
using moe_detail::check_matrix;
using moe_detail::check_multiple;
using moe_detail::throw_if_failed;

namespace {

// A contiguous [experts, rows, cols] FP8 weight stack on x's device.
void check_fp8_experts(const TensorArg& w, const TensorArg& x) {
  check_cuda(w);
  check_same_device(x, w);
  check_dtype(w, DType::kFloat8E4M3);
  check_ndim(w, 3);
  check_contiguous(w);
}

void check_ids(const TensorArg& ids, const TensorArg& like) {
  check_cuda(ids);
  check_same_device(like, ids);
  check_dtype(ids, DType::kInt32);
  check_ndim(ids, 2);
  check_contiguous(ids);
  if (ids.shape[1] < 1 || ids.shape[1] > kernels::kRouteMaxTopK)
    ::dgemma::throw_invalid(ids.name + " has shape " + ids.shape_str() + ": top_k must be in [1, " +
                                std::to_string(kernels::kRouteMaxTopK) + "]");
  if (ids.shape[0] * ids.shape[1] >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(ids.name + " has " + std::to_string(ids.numel()) + " entries, expected < 2^31");
}

void check_experts(int experts) {
  if (experts < 1 || experts > kernels::kPlanMaxExperts)
    ::dgemma::throw_invalid("experts is " + std::to_string(experts) + ", expected 1.." +
                                std::to_string(kernels::kPlanMaxExperts));
}

// The expert GEMM's token tile: DGEMMA_MOE_TILE=32|64|128 (read once) overrides the choice by rows per expert,
// for sweeps on a GPU; 0 when unset.
int moe_tile_override() {
  static const int tile = [] {
    const char* v = std::getenv("DGEMMA_MOE_TILE");
    if (v == nullptr || *v == '\0') return 0;
    std::string names;
    for (const int t : kernels::kMoeGemmTiles) {
      if (std::to_string(t) == v) return t;
      names += (names.empty() ? "" : ", ") + std::to_string(t);
    }
    ::dgemma::throw_invalid(std::string("DGEMMA_MOE_TILE=") + v + " is not a compiled expert GEMM tile (" + names +
                            ")");
  }();
  return tile;
}

// Every intermediate of the MoE layer, in one workspace. rows: the intermediates' rows, the routed rows (pointer
// array) or, for the contiguous pipeline, the routed rows plus each expert's worst padding, in whole tiles.
struct MoeBuffers {
  bool contiguous;
  int rows;
  int moe_tile;                      // contiguous: the expert GEMM's token tile (= the plan's padding)
  kernels::Fp8GemmTile group_tile;   // pointer array: the grouped GEMM's token tile
  int32_t* offsets;
  int32_t* row_of;
  int32_t* row_expert;
  int32_t* row_src;      // contiguous only
  int32_t* tile_expert;  // contiguous only
  int32_t* num_tiles;    // contiguous only
  int32_t* plan_scratch;
  uint8_t* xq;
  float* x_scale;
  __nv_bfloat16* gate_up;
  uint8_t* hq;
  float* h_scale;
  __nv_bfloat16* down;
  void* gemm1;
  void* gemm2;
  size_t gemm1_bytes, gemm2_bytes, total;
};

MoeBuffers moe_buffers(void* base, int64_t tokens, int slots, int hidden, int inter, int experts, int sms, int device,
                       bool contiguous) {
  MoeBuffers b{};
  b.contiguous = contiguous;
  const int64_t routed = tokens * slots;  // slots: top_k routed + the shared experts, per token
  int64_t rows = routed;
  if (contiguous) {
    b.moe_tile = moe_tile_override() != 0 ? moe_tile_override() : kernels::choose_moe_gemm_tile(routed, experts);
    rows = (routed + static_cast<int64_t>(experts) * (b.moe_tile - 1) + b.moe_tile - 1) / b.moe_tile * b.moe_tile;
    if (rows >= (int64_t(1) << 31))
      ::dgemma::throw_invalid("moe_fp8: " + std::to_string(tokens) + " tokens x " + std::to_string(slots) +
                              " slots (routed and shared) with padding exceed 2^31 rows");
  } else {
    b.group_tile = kernels::choose_fp8_gemm_tile(routed, experts, false);
  }
  b.rows = static_cast<int>(rows);
  const size_t r = static_cast<size_t>(rows);
  Carver c(base);
  b.offsets = c.take<int32_t>(experts + 1);
  b.row_of = c.take<int32_t>(static_cast<size_t>(routed));
  b.row_expert = c.take<int32_t>(r);
  if (contiguous) {
    b.row_src = c.take<int32_t>(r);
    b.tile_expert = c.take<int32_t>(r / b.moe_tile);
    b.num_tiles = c.take<int32_t>(1);
  }
  b.plan_scratch = c.take<int32_t>(static_cast<size_t>(kernels::moe_plan_scratch_ints(routed, experts)));
  b.xq = c.take<uint8_t>(r * hidden);
  b.x_scale = c.take<float>(r);
  b.gate_up = c.take<__nv_bfloat16>(r * 2 * inter);
  b.hq = c.take<uint8_t>(r * inter);
  b.h_scale = c.take<float>(r);
  b.down = c.take<__nv_bfloat16>(r * hidden);
  if (contiguous) {
    kernels::MoeGemmProblem p;
    p.experts = experts;
    p.rows_cap = b.rows;
    p.n_out = p.ldo = 2 * inter;
    p.k = hidden;
    b.gemm1_bytes = kernels::sm90_moe_gemm_workspace_bytes(b.moe_tile, p, sms, device);
    p.n_out = p.ldo = hidden;
    p.k = inter;
    b.gemm2_bytes = kernels::sm90_moe_gemm_workspace_bytes(b.moe_tile, p, sms, device);
  } else {
    // Both GEMMs have `experts` groups and the same instantiation, hence the same scratch size.
    b.gemm1_bytes = b.gemm2_bytes = kernels::sm90_fp8_grouped_gemm_scratch_bytes(b.group_tile, experts, sms, device);
  }
  b.gemm1 = c.take<uint8_t>(b.gemm1_bytes);
  b.gemm2 = c.take<uint8_t>(b.gemm2_bytes);
  b.total = c.used();
  return b;
}

// The router variant: DGEMMA_ROUTE_TILE = a name of kernels::kRouteTiles ("tc", "4x8", ...; read once), for sweeps.
int route_tile() {
  static const int tile = [] {
    const char* v = std::getenv("DGEMMA_ROUTE_TILE");
    if (v == nullptr || *v == '\0') return 0;
    std::string names;
    int i = 0;
    for (const kernels::RouteTile& t : kernels::kRouteTiles) {
      const std::string name = t.name;
      if (name == v) return i;
      names += (i++ ? ", " : "") + name;
    }
    ::dgemma::throw_invalid(std::string("DGEMMA_ROUTE_TILE=") + v + " is not a compiled router tile (" + names + ")");
  }();
  return tile;
}

}  // namespace

void moe_route(const TensorArg& x, const TensorArg& scale, const TensorArg& proj, const TensorArg& expert_scale,
               int top_k, double eps, const TensorArg& weights, const TensorArg& ids, std::uintptr_t stream,
               const TensorArg* residual_y, const TensorArg* residual_w, const TensorArg* residual_out) {
  check_cuda(x);
  check_dtype(x, DType::kBFloat16);
  check_ndim(x, 2);
  if (x.strides[1] != 1) ::dgemma::throw_invalid(x.name + " must be contiguous in its last dimension");
  const int64_t tokens = x.shape[0], hidden = x.shape[1];
  check_multiple(hidden, 8, x.name + " last dimension (hidden)");
  check_multiple(x.strides[0], 8, x.name + " row stride");
  check_aligned(x, 16);
  check_cuda(proj);
  check_same_device(x, proj);
  check_matrix(proj, DType::kBFloat16, -1, hidden, "", "hidden");
  check_aligned(proj, 16);
  const int64_t experts = proj.shape[0];
  if (experts < 32 || experts > kernels::kRouteMaxExperts || experts % 32 != 0)
    ::dgemma::throw_invalid(proj.name + " has " + std::to_string(experts) +
                                " experts (rows), expected a multiple of 32 up to " +
                                std::to_string(kernels::kRouteMaxExperts));
  check_vector(scale, DType::kBFloat16, hidden, "hidden", x);
  check_vector(expert_scale, DType::kBFloat16, experts, "experts", x);
  if (top_k < 1 || top_k > kernels::kRouteMaxTopK || top_k > experts)
    ::dgemma::throw_invalid("top_k is " + std::to_string(top_k) + ", expected 1.." +
                                std::to_string(std::min<int64_t>(kernels::kRouteMaxTopK, experts)));
  if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  check_same_device(x, weights);
  check_matrix(weights, DType::kFloat32, tokens, top_k, "tokens", "top_k");
  check_same_device(x, ids);
  check_matrix(ids, DType::kInt32, tokens, top_k, "tokens", "top_k");
  if (kernels::route_smem_bytes(static_cast<int>(hidden), static_cast<int>(experts)) > kernels::kRouteMaxSmemBytes)
    ::dgemma::throw_invalid(x.name + " hidden size " + std::to_string(hidden) + " is too large for the router");
  // The fused attention residual: all three or none; the routed rows are then residual_out's.
  kernels::RouteResidual res;
  const int given = (residual_y != nullptr) + (residual_w != nullptr) + (residual_out != nullptr);
  if (given != 0 && given != 3)
    ::dgemma::throw_invalid("residual_y, residual_w and residual_out go together (the router's fused residual update)");
  if (given == 3) {
    check_contiguous(x);
    check_same_device(x, *residual_y);
    check_matrix(*residual_y, DType::kBFloat16, tokens, hidden, "tokens", "hidden");
    check_vector(*residual_w, DType::kBFloat16, hidden, "hidden", x);
    check_same_device(x, *residual_out);
    check_matrix(*residual_out, DType::kBFloat16, tokens, hidden, "tokens", "hidden");
    for (const TensorArg* t : {residual_y, residual_out}) check_aligned(*t, 16);
    if (moe_detail::overlaps(*residual_out, x) || moe_detail::overlaps(*residual_out, *residual_y))
      ::dgemma::throw_invalid("residual_out must not alias x or residual_y (other rows still read them)");
    res.y = static_cast<const __nv_bfloat16*>(residual_y->data);
    res.w = static_cast<const __nv_bfloat16*>(residual_w->data);
    res.out = static_cast<__nv_bfloat16*>(residual_out->data);
  }

  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  const float inv_sqrt_hidden = static_cast<float>(std::pow(static_cast<double>(hidden), -0.5));
  const kernels::RouteParams p{static_cast<const __nv_bfloat16*>(x.data),
                               x.strides[0],
                               static_cast<const __nv_bfloat16*>(scale.data),
                               static_cast<const __nv_bfloat16*>(proj.data),
                               static_cast<const __nv_bfloat16*>(expert_scale.data),
                               tokens,
                               static_cast<int>(hidden),
                               static_cast<int>(experts),
                               top_k,
                               static_cast<float>(eps),
                               inv_sqrt_hidden,
                               static_cast<float*>(weights.data),
                               static_cast<int32_t*>(ids.data),
                               res};
  throw_if_failed(kernels::route(p, reinterpret_cast<cudaStream_t>(stream), route_tile()), "moe_route launch");
}

void moe_plan(const TensorArg& ids, int experts, const TensorArg& offsets, const TensorArg& row_of,
              const TensorArg& row_expert, std::uintptr_t stream, int pad, const TensorArg* row_src,
              const TensorArg* tile_expert, const TensorArg* num_tiles, const TensorArg* scratch) {
  check_ids(ids, ids);
  check_experts(experts);
  if (pad < 1 || pad > 1024)
    ::dgemma::throw_invalid("pad is " + std::to_string(pad) + ", expected 1..1024");
  // Padded rows: the routed rows plus at most pad - 1 per expert.
  const int64_t rows = ids.numel() + static_cast<int64_t>(experts) * (pad - 1);
  if (rows >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(ids.name + " has " + std::to_string(ids.numel()) + " entries: with pad " +
                            std::to_string(pad) + " the padded rows exceed 2^31");
  check_vector(offsets, DType::kInt32, experts + 1, "experts + 1", ids);
  check_same_device(ids, row_of);
  check_matrix(row_of, DType::kInt32, ids.shape[0], ids.shape[1], "tokens", "top_k");
  if (pad == 1) {
    check_vector(row_expert, DType::kInt32, ids.numel(), "tokens * top_k", ids);
    if (row_src != nullptr || tile_expert != nullptr || num_tiles != nullptr)
      ::dgemma::throw_invalid("row_src, tile_expert and num_tiles are outputs of a padded plan (pad > 1)");
  } else {
    check_vector(row_expert, DType::kInt32, rows, "tokens * top_k + experts * (pad - 1)", ids);
    if (row_src == nullptr || tile_expert == nullptr || num_tiles == nullptr)
      ::dgemma::throw_invalid("a padded plan (pad > 1) writes row_src, tile_expert and num_tiles: pass all three");
    check_vector(*row_src, DType::kInt32, rows, "tokens * top_k + experts * (pad - 1)", ids);
    check_vector(*tile_expert, DType::kInt32, (rows + pad - 1) / pad, "ceil(padded rows / pad)", ids);
    check_vector(*num_tiles, DType::kInt32, 1, "1", ids);
  }
  if (scratch != nullptr) {
    check_cuda(*scratch);
    check_same_device(ids, *scratch);
    check_dtype(*scratch, DType::kInt32);
    check_contiguous(*scratch);
    const int64_t need = kernels::moe_plan_scratch_ints(ids.numel(), experts);
    if (scratch->numel() < need)
      ::dgemma::throw_invalid(scratch->name + " has " + std::to_string(scratch->numel()) +
                              " entries, expected at least " +
                              std::to_string(need) + " (experts * ceil(tokens * top_k / 1024))");
  }
  throw_if_failed(cudaSetDevice(ids.device), "cudaSetDevice");
  auto data = [](const TensorArg* t) { return t != nullptr ? static_cast<int32_t*>(t->data) : nullptr; };
  throw_if_failed(kernels::moe_plan(static_cast<const int32_t*>(ids.data), static_cast<int>(ids.shape[0]),
                                    static_cast<int>(ids.shape[1]), experts, static_cast<int32_t*>(offsets.data),
                                    static_cast<int32_t*>(row_of.data), static_cast<int32_t*>(row_expert.data),
                                    reinterpret_cast<cudaStream_t>(stream), pad, data(row_src), data(tile_expert),
                                    data(num_tiles), data(scratch)),
                  "moe_plan launch");
}

size_t moe_fp8_workspace_bytes(int64_t tokens, int top_k, int hidden, int inter, int experts, int device,
                               bool contiguous) {
  if (tokens < 0 || top_k < 1 || hidden < 1 || inter < 1 || experts < 1)
    ::dgemma::throw_invalid("moe_fp8_workspace_bytes: sizes must be positive (tokens may be 0)");
  return moe_buffers(nullptr, tokens, top_k, hidden, inter, experts, moe_detail::sm_count(device), device, contiguous)
      .total;
}

MoeWorkspaceLayout moe_fp8_workspace_layout(int64_t tokens, int slots, int hidden, int inter, int experts, int device) {
  if (tokens < 0 || slots < 1 || hidden < 1 || inter < 1 || experts < 1)
    ::dgemma::throw_invalid("moe_fp8_workspace_layout: sizes must be positive (tokens may be 0)");
  // A stand-in base: the buffers' pointers minus it are their byte offsets (nothing is dereferenced).
  char* const base = reinterpret_cast<char*>(uintptr_t(1) << 20);
  const MoeBuffers b = moe_buffers(base, tokens, slots, hidden, inter, experts, moe_detail::sm_count(device), device,
                                   true);
  return {reinterpret_cast<char*>(b.down) - base, b.rows, reinterpret_cast<char*>(b.row_of) - base};
}

void moe_fp8(const TensorArg& x, const TensorArg& ids, const TensorArg& weights, const TensorArg& gate_up_q,
             const TensorArg& gate_up_scale, const TensorArg& down_q, const TensorArg& down_scale, const TensorArg* out,
             const TensorArg& workspace, std::uintptr_t stream, bool contiguous, const TensorArg* norm, double eps,
             int shared, const TensorArg* shared_norm, const TensorArg* shared_out, bool combine) {
  check_matrix(x, DType::kBFloat16, -1, -1, "tokens", "hidden");
  const int64_t tokens = x.shape[0], hidden = x.shape[1];
  if (norm != nullptr) {
    check_vector(*norm, DType::kBFloat16, hidden, "hidden", x);
    if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  }
  check_ids(ids, x);
  check_dim(ids, 0, tokens, "tokens (rows of x)");
  const int top_k = static_cast<int>(ids.shape[1]);
  check_same_device(x, weights);
  check_matrix(weights, DType::kFloat32, tokens, top_k, "tokens", "top_k");
  check_fp8_experts(gate_up_q, x);
  const int64_t experts = gate_up_q.shape[0], two_inter = gate_up_q.shape[1];
  if (experts < 1 || experts > kernels::kPlanMaxExperts)
    ::dgemma::throw_invalid(gate_up_q.name + " has " + std::to_string(experts) + " experts, expected 1.." +
                                std::to_string(kernels::kPlanMaxExperts));
  // Shared experts: the last `shared` experts of the stacks, visited by every token with weight 1 after its routed
  // slots, summed into shared_out (and normed with shared_norm when norm is given).
  if (shared < 0 || shared >= experts)
    ::dgemma::throw_invalid("shared is " + std::to_string(shared) + ", expected 0.." + std::to_string(experts - 1) +
                            " (shared experts are the last of the " + std::to_string(experts) + " in " +
                            gate_up_q.name + "; at least one must be routed)");
  if (shared > 0 && !contiguous)
    ::dgemma::throw_invalid("shared experts (shared = " + std::to_string(shared) +
                            ") run on the contiguous pipeline only (contiguous = true)");
  if (shared > kernels::kMaxSharedExperts)
    ::dgemma::throw_invalid("shared is " + std::to_string(shared) + ", expected at most " +
                            std::to_string(kernels::kMaxSharedExperts));
  if (!combine) {
    if (!contiguous) ::dgemma::throw_invalid("combine = false needs the contiguous pipeline (contiguous = true)");
    if (out != nullptr || shared_out != nullptr)
      ::dgemma::throw_invalid("out and shared_out are the combine's: with combine = false pass neither (the rows stay "
                              "in the workspace, see moe_fp8_workspace_layout)");
  } else {
    if (out == nullptr) ::dgemma::throw_invalid("out is required (the combined rows) unless combine = false");
    if ((shared > 0) != (shared_out != nullptr))
      ::dgemma::throw_invalid(shared > 0 ? "shared experts need shared_out (their sum per token)"
                                         : "shared_out is given but shared is 0");
  }
  if (shared_norm != nullptr && (shared == 0 || norm == nullptr))
    ::dgemma::throw_invalid("shared_norm is given without norm and shared experts (shared > 0)");
  if (shared > 0 && norm != nullptr && shared_norm == nullptr)
    ::dgemma::throw_invalid("norm is given with shared experts: pass shared_norm (their own pre-norm weight)");
  if (shared_norm != nullptr) check_vector(*shared_norm, DType::kBFloat16, hidden, "hidden", x);
  if (shared_out != nullptr) {
    check_same_device(x, *shared_out);
    check_matrix(*shared_out, DType::kBFloat16, tokens, hidden, "tokens", "hidden");
    check_aligned(*shared_out, 16);
    if (out != nullptr && moe_detail::overlaps(*shared_out, *out))
      ::dgemma::throw_invalid("shared_out must not overlap out (the combine writes both)");
  }
  const kernels::GatherNorm gather_norm{
      norm != nullptr, norm != nullptr ? static_cast<const __nv_bfloat16*>(norm->data) : nullptr,
      static_cast<float>(eps), shared_norm != nullptr ? static_cast<const __nv_bfloat16*>(shared_norm->data) : nullptr,
      top_k};
  const int slots = top_k + shared;
  if (tokens * slots >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(ids.name + ": " + std::to_string(tokens) + " tokens x " + std::to_string(slots) +
                            " slots (routed and shared) exceed 2^31");
  check_dim(gate_up_q, 2, hidden, "hidden (columns of x)");
  check_multiple(two_inter, 32, gate_up_q.name + " dimension 1 (2 * intermediate)");
  const int64_t inter = two_inter / 2;  // a multiple of 16: the down GEMM's K (16-byte fp8 rows)
  check_multiple(hidden, 16, x.name + " last dimension (hidden)");
  if (hidden > kernels::kGatherMaxHidden)
    ::dgemma::throw_invalid(x.name + " hidden size " + std::to_string(hidden) + " exceeds " +
                                std::to_string(kernels::kGatherMaxHidden));
  if (inter > kernels::kGeluUpMaxInter)
    ::dgemma::throw_invalid(gate_up_q.name + " intermediate size " + std::to_string(inter) + " exceeds " +
                                std::to_string(kernels::kGeluUpMaxInter));
  check_same_device(x, gate_up_scale);
  check_matrix(gate_up_scale, DType::kFloat32, experts, two_inter, "experts", "2 * intermediate");
  check_fp8_experts(down_q, x);
  check_dim(down_q, 0, experts, "experts");
  check_dim(down_q, 1, hidden, "hidden");
  check_dim(down_q, 2, inter, "intermediate");
  check_same_device(x, down_scale);
  check_matrix(down_scale, DType::kFloat32, experts, hidden, "experts", "hidden");
  if (out != nullptr) {
    check_same_device(x, *out);
    check_matrix(*out, DType::kBFloat16, tokens, hidden, "tokens", "hidden");
  }
  for (const TensorArg* t : {&x, out, &gate_up_q, &down_q, &gate_up_scale, &down_scale})
    if (t != nullptr) check_aligned(*t, 16);

  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  const int sms = moe_detail::sm_count(x.device);
  const int E = static_cast<int>(experts), H = static_cast<int>(hidden), I = static_cast<int>(inter);
  moe_detail::check_workspace(workspace, moe_buffers(nullptr, tokens, slots, H, I, E, sms, x.device, contiguous).total,
                              x.device);
  if (tokens == 0) return;
  const MoeBuffers b = moe_buffers(workspace.data, tokens, slots, H, I, E, sms, x.device, contiguous);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* idp = static_cast<const int32_t*>(ids.data);
  const int pad = contiguous ? b.moe_tile : 1;
  throw_if_failed(kernels::moe_plan(idp, static_cast<int>(tokens), top_k, E - shared, b.offsets, b.row_of,
                                    b.row_expert, s, pad, b.row_src, b.tile_expert, b.num_tiles, b.plan_scratch,
                                    shared),
                  "moe_plan launch");
  const kernels::GatherPadding padding{contiguous ? b.offsets : nullptr, b.row_src, pad};
  throw_if_failed(kernels::moe_gather_quantize(static_cast<const __nv_bfloat16*>(x.data), hidden, tokens, H, slots,
                                               b.row_of, b.xq, b.x_scale, s, padding, E, gather_norm),
                  "moe_gather_quantize launch");

  if (contiguous) {
    kernels::MoeGemmProblem g1;
    g1.experts = E;
    g1.n_out = 2 * I;
    g1.k = H;
    g1.w = static_cast<const uint8_t*>(gate_up_q.data);
    g1.w_scale = static_cast<const float*>(gate_up_scale.data);
    g1.x = b.xq;
    g1.row_scale = b.x_scale;
    g1.rows_cap = b.rows;
    g1.tile_expert = b.tile_expert;
    g1.num_tiles = b.num_tiles;
    g1.out = b.gate_up;
    g1.ldo = two_inter;
    throw_if_failed(kernels::sm90_moe_gemm(b.moe_tile, g1, b.gemm1, b.gemm1_bytes, sms, x.device, s),
                    "expert GEMM gate_up");
    kernels::GeluUpScales prescaled{nullptr, nullptr, 0, nullptr, b.offsets + E};
    prescaled.row_src = b.row_src;
    prescaled.row_weight = static_cast<const float*>(weights.data);
    prescaled.slots = slots;
    prescaled.top_k = top_k;
    throw_if_failed(kernels::gelu_up_quantize(b.gate_up, nullptr, b.rows, I, prescaled, b.hq, b.h_scale, s),
                    "gelu_up_quantize launch");
    kernels::MoeGemmProblem g2 = g1;
    g2.n_out = H;
    g2.k = I;
    g2.w = static_cast<const uint8_t*>(down_q.data);
    g2.w_scale = static_cast<const float*>(down_scale.data);
    g2.x = b.hq;
    g2.row_scale = b.h_scale;
    g2.out = b.down;
    g2.ldo = hidden;
    throw_if_failed(kernels::sm90_moe_gemm(b.moe_tile, g2, b.gemm2, b.gemm2_bytes, sms, x.device, s),
                    "expert GEMM down");
    if (!combine) return;  // the caller reads b.down / b.row_of (moe_fp8_workspace_layout)
    auto* shared_rows = shared_out != nullptr ? static_cast<__nv_bfloat16*>(shared_out->data) : nullptr;
    throw_if_failed(kernels::moe_combine(b.down, nullptr, nullptr, idp, nullptr, b.row_of, tokens, H, slots,
                                         static_cast<__nv_bfloat16*>(out->data), hidden, s, shared_rows, top_k),
                    "moe_combine launch");
    return;
  }

  kernels::Fp8GroupedGemmProblem g1;
  g1.groups = E;
  g1.n_out = 2 * I;
  g1.k = H;
  g1.weights = static_cast<const uint8_t*>(gate_up_q.data);
  g1.weight_group_stride = two_inter * hidden;
  g1.activations = b.xq;
  g1.row_offsets = b.offsets;
  g1.rows = b.rows;
  g1.out = b.gate_up;
  g1.ldo = two_inter;
  kernels::Fp8GroupedGemmProblem g2 = g1;
  g2.n_out = H;
  g2.k = I;
  g2.weights = static_cast<const uint8_t*>(down_q.data);
  g2.weight_group_stride = hidden * inter;
  g2.activations = b.hq;
  g2.out = b.down;
  g2.ldo = hidden;
  // Both GEMMs' per-expert arguments in one launch: the row offsets they read are final after the plan.
  const auto tile = b.group_tile;
  throw_if_failed(kernels::sm90_fp8_grouped_gemm_args(tile, g1, b.gemm1, b.gemm1_bytes, &g2, b.gemm2, b.gemm2_bytes,
                                                      sms, x.device, s),
                  "grouped GEMM arguments");
  throw_if_failed(kernels::sm90_fp8_grouped_gemm(tile, g1, b.gemm1, b.gemm1_bytes, sms, x.device, s, true),
                  "grouped GEMM gate_up");
  const auto* gus = static_cast<const float*>(gate_up_scale.data);
  const kernels::GeluUpScales scales{gus, gus + I, two_inter, b.row_expert, b.offsets + E};
  throw_if_failed(kernels::gelu_up_quantize(b.gate_up, b.x_scale, b.rows, I, scales, b.hq, b.h_scale, s),
                  "gelu_up_quantize launch");
  throw_if_failed(kernels::sm90_fp8_grouped_gemm(tile, g2, b.gemm2, b.gemm2_bytes, sms, x.device, s, true),
                  "grouped GEMM down");
  throw_if_failed(kernels::moe_combine(b.down, b.h_scale, static_cast<const float*>(down_scale.data), idp,
                                       static_cast<const float*>(weights.data), b.row_of, tokens, H, top_k,
                                       static_cast<__nv_bfloat16*>(out->data), hidden, s),
                  "moe_combine launch");
}

}  // namespace dgemma
