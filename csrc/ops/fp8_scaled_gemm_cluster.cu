// The sm90 FP8 scaled dense GEMM in clusters of 2 x 2 tiles (64- and 128-token tiles), and the setting that picks it
// (kernels/sm90_fp8_scaled_gemm.cuh).
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/sm90_fp8_scaled_gemm_impl.cuh"
#include "ops/tensor_arg.h"

namespace dgemma::kernels {

int dense_cluster_setting() {
  static const char* const raw = std::getenv("DGEMMA_DENSE_CLUSTER");
  static const int setting = [] {
    if (raw == nullptr || *raw == '\0' || std::strcmp(raw, "off") == 0) return 1;
    return std::strcmp(raw, "2x2") == 0 ? 2 : 0;
  }();
  if (setting == 0)
    ::dgemma::throw_invalid(std::string("DGEMMA_DENSE_CLUSTER=") + raw +
                            " is not a dense GEMM cluster (off or 2x2)");
  return setting;
}

size_t sm90_fp8_scaled_gemm_n64_c2_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  return sm90_fp8_scaled::workspace_bytes<64, 2>(p, sm_count, device);
}

cudaError_t sm90_fp8_scaled_gemm_n64_c2(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes,
                                         int sm_count, int device, cudaStream_t stream) {
  return sm90_fp8_scaled::run<64, 2>(p, workspace, workspace_bytes, sm_count, device, stream);
}

size_t sm90_fp8_scaled_gemm_n128_c2_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  return sm90_fp8_scaled::workspace_bytes<128, 2>(p, sm_count, device);
}

cudaError_t sm90_fp8_scaled_gemm_n128_c2(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes,
                                          int sm_count, int device, cudaStream_t stream) {
  return sm90_fp8_scaled::run<128, 2>(p, workspace, workspace_bytes, sm_count, device, stream);
}

}  // namespace dgemma::kernels
