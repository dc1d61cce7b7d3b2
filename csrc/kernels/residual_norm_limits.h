// The residual kernel's limit when it sums the expert pipeline's rows itself (residual_norm.cuh ExpertBranches),
// shared by the kernel, its launcher and the capability query the Python ops ask
// (_C.ffn_residual_experts_unsupported). Plain C++: also compiled in builds without CUDA.
#pragma once

#include <cstdint>
#include <string>

namespace dgemma::kernels {

constexpr int kExpertBranchesMaxDim = 3072;  // both branch rows of each warp in 48 KiB of shared memory

// Why the residual kernel cannot sum the expert rows of this hidden size, or "" when it can.
inline std::string expert_branches_unsupported(int64_t dim) {
  if (dim < 8 || dim % 8 != 0 || dim > kExpertBranchesMaxDim)
    return "hidden size " + std::to_string(dim) + ": expected a multiple of 8 up to " +
           std::to_string(kExpertBranchesMaxDim);
  return "";
}

}  // namespace dgemma::kernels
