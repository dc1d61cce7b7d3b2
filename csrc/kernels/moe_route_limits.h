// The router kernel's limits, shared by the kernel (moe_route.cuh), its launcher and the capability query
// the Python ops ask (_C.moe_route_unsupported). Plain C++: also compiled in builds without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dgemma::kernels {

constexpr int kRouteMaxTokens = 8;  // the largest tile's tokens per block (sizes the shared memory check)
constexpr int kRouteMaxExperts = 256;
constexpr int kRouteMaxTopK = 16;
constexpr size_t kRouteMaxSmemBytes = 200 * 1024;

// Dynamic shared memory of a tile of `tokens_per_block` tokens: their normalised rows (bf16) + their logits (fp32).
inline size_t route_smem_bytes(int hidden, int experts, int tokens_per_block = kRouteMaxTokens) {
  return static_cast<size_t>(tokens_per_block) * hidden * 2 + static_cast<size_t>(tokens_per_block) * experts * 4;
}

// Why the router cannot run these sizes, or "" when it can.
inline std::string route_unsupported(int64_t experts, int64_t top_k, int64_t hidden) {
  if (experts < 32 || experts > kRouteMaxExperts || experts % 32 != 0)
    return std::to_string(experts) + " experts: expected a multiple of 32 up to " + std::to_string(kRouteMaxExperts);
  if (top_k < 1 || top_k > kRouteMaxTopK || top_k > experts)
    return "top_k " + std::to_string(top_k) + ": expected 1.." +
           std::to_string(experts < kRouteMaxTopK ? experts : kRouteMaxTopK);
  if (hidden < 8 || hidden % 8 != 0 || hidden > (1 << 20))
    return "hidden size " + std::to_string(hidden) + ": expected a positive multiple of 8";
  if (route_smem_bytes(static_cast<int>(hidden), static_cast<int>(experts)) > kRouteMaxSmemBytes)
    return "hidden size " + std::to_string(hidden) + " is too large for the router's shared memory";
  return "";
}

}  // namespace dgemma::kernels
