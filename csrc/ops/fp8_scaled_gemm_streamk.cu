// The sm90 FP8 scaled dense GEMM on CUTLASS's stream-K scheduler (32-, 64- and 128-token tiles), and the setting that
// picks it (kernels/sm90_fp8_scaled_gemm.cuh).
//
// NOTE: compiled without CUTLASS's grid dependency control, as the head's P·E GEMM (vocab_head_sm90_soft.cu): CUTLASS
// 4.2's stream-K scheduler does not compile with it, so these GEMMs are launched without the PDL attribute.
#undef CUTLASS_ENABLE_GDC_FOR_SM90

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/sm90_fp8_scaled_gemm_impl.cuh"
#include "ops/tensor_arg.h"

namespace dgemma::kernels {

bool dense_streamk_setting() {
  static const char* const raw = std::getenv("DGEMMA_DENSE_SCHEDULE");
  static const int setting = [] {
    if (raw == nullptr || *raw == '\0' || std::strcmp(raw, "persistent") == 0) return 0;
    return std::strcmp(raw, "streamk") == 0 ? 1 : -1;
  }();
  if (setting < 0)
    ::dgemma::throw_invalid(std::string("DGEMMA_DENSE_SCHEDULE=") + raw +
                            " is not a dense GEMM schedule (persistent or streamk)");
  return setting == 1;
}

#define DGEMMA_DEFINE_STREAMK_GEMM(N)                                                                              \
  size_t sm90_fp8_scaled_gemm_n##N##_sk_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) { \
    return sm90_fp8_scaled::workspace_bytes<N, 1, cutlass::gemm::StreamKScheduler>(p, sm_count, device);           \
  }                                                                                                                \
  cudaError_t sm90_fp8_scaled_gemm_n##N##_sk(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes, \
                                             int sm_count, int device, cudaStream_t stream) {                       \
    return sm90_fp8_scaled::run<N, 1, cutlass::gemm::StreamKScheduler>(p, workspace, workspace_bytes, sm_count,     \
                                                                       device, stream);                            \
  }
DGEMMA_DEFINE_STREAMK_GEMM(32)
DGEMMA_DEFINE_STREAMK_GEMM(64)
DGEMMA_DEFINE_STREAMK_GEMM(128)
#undef DGEMMA_DEFINE_STREAMK_GEMM

}  // namespace dgemma::kernels
