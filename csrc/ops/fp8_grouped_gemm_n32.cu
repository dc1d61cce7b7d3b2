// The sm90 FP8 grouped GEMM with a 32-token tile (one CUTLASS instantiation per file).
#include "kernels/sm90_fp8_grouped_gemm_impl.cuh"

namespace dgemma::kernels {

size_t sm90_fp8_grouped_gemm_n32_scratch_bytes(int groups, int sm_count, int device) {
  return sm90_fp8::grouped_gemm_scratch_bytes<32>(groups, sm_count, device);
}

cudaError_t sm90_fp8_grouped_gemm_n32_args(const Fp8GroupedGemmProblem& p1, void* scratch1, size_t bytes1,
                                          const Fp8GroupedGemmProblem* p2, void* scratch2, size_t bytes2,
                                          int sm_count, int device, cudaStream_t stream) {
  return sm90_fp8::build_grouped_args<32>(p1, scratch1, bytes1, p2, scratch2, bytes2, sm_count, device, stream);
}

cudaError_t sm90_fp8_grouped_gemm_n32(const Fp8GroupedGemmProblem& p, void* scratch, size_t scratch_bytes,
                                      int sm_count, int device, cudaStream_t stream, bool args_ready) {
  return sm90_fp8::grouped_gemm<32>(p, scratch, scratch_bytes, sm_count, device, stream, args_ready);
}

}  // namespace dgemma::kernels
