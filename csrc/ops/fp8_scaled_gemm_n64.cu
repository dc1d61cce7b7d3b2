// The sm90 FP8 scaled dense GEMM with a 64-token tile (one CUTLASS instantiation per file).
#include "kernels/sm90_fp8_scaled_gemm_impl.cuh"

namespace dgemma::kernels {

size_t sm90_fp8_scaled_gemm_n64_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  return sm90_fp8_scaled::workspace_bytes<64>(p, sm_count, device);
}

cudaError_t sm90_fp8_scaled_gemm_n64(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes,
                                      int sm_count, int device, cudaStream_t stream) {
  return sm90_fp8_scaled::run<64>(p, workspace, workspace_bytes, sm_count, device, stream);
}

}  // namespace dgemma::kernels
