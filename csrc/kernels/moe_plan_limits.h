// The dispatch plan's and the expert pipeline's limits, shared by the kernels (moe_dispatch.cuh), their launchers
// (ops/moe.cu) and the capability queries the Python ops ask (_C.moe_plan_scratch_ints,
// _C.moe_shared_experts_unsupported). Plain C++: also compiled in builds without CUDA.
#pragma once

#include <cstdint>
#include <string>

namespace dgemma::kernels {

constexpr int kPlanThreads = 1024;     // a plan block's threads: one chunk of entries per pass
constexpr int kPlanMaxExperts = 256;   // experts one plan sorts into (routed and shared together)
constexpr int kMaxSharedExperts = 16;  // shared experts every token visits after its routed slots

// The contiguous expert GEMM's token-tile widths compiled (one .cu file each, sm90_moe_grouped_gemm.cuh).
constexpr int kMoeGemmTiles[] = {32, 64, 128};

// The token tile for `routed_rows` rows over `experts` experts (the plan pads each expert's rows to it).
// NOTE: the expert weights dominate the bytes and each (expert, weight tile) is read once per token tile of
// that expert, so the tile should cover a typical expert's rows once; narrower tiles pad less. ~16 rows per
// expert at one 256-token canvas (top-8 of 128 experts) -> 32; ~64 at four canvases -> 64; prefill -> 128.
inline int choose_moe_gemm_tile(int64_t routed_rows, int experts) {
  const int64_t per_expert = routed_rows / (experts > 0 ? experts : 1);
  if (per_expert <= 24) return 32;
  return per_expert <= 96 ? 64 : 128;
}

// Scratch (int32 entries) of the multi-block plan for `entries` routed entries of `experts` experts.
inline int64_t moe_plan_scratch_ints(int64_t entries, int experts) {
  return (entries + kPlanThreads - 1) / kPlanThreads * experts;
}

// Why an expert stack of `experts` experts, the last `shared` of them shared, cannot run, or "" when it can.
inline std::string shared_experts_unsupported(int64_t experts, int64_t shared) {
  if (experts < 1 || experts > kPlanMaxExperts)
    return std::to_string(experts) + " experts: expected 1.." + std::to_string(kPlanMaxExperts);
  if (shared < 0 || shared >= experts)
    return "shared " + std::to_string(shared) + ": expected 0.." + std::to_string(experts - 1) +
           " (at least one expert must be routed)";
  if (shared > kMaxSharedExperts)
    return "shared " + std::to_string(shared) + ": expected at most " + std::to_string(kMaxSharedExperts);
  return "";
}

}  // namespace dgemma::kernels
