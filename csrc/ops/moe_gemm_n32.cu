// The MoE experts' contiguous FP8 GEMM with a 32-token tile (one CUTLASS instantiation per file).
#include "kernels/sm90_moe_grouped_gemm_impl.cuh"

namespace dgemma::kernels {

size_t sm90_moe_gemm_n32_workspace_bytes(const MoeGemmProblem& p, int sm_count, int device) {
  return sm90_moe::workspace_bytes<32>(p, sm_count, device);
}

cudaError_t sm90_moe_gemm_n32(const MoeGemmProblem& p, void* workspace, size_t workspace_bytes, int sm_count,
                               int device, cudaStream_t stream) {
  return sm90_moe::run<32>(p, workspace, workspace_bytes, sm_count, device, stream);
}

}  // namespace dgemma::kernels
