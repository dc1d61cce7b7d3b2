// Launch helpers shared by the CUTLASS kernels we instantiate (sm90_fp8_scaled_gemm_impl.cuh,
// sm90_moe_grouped_gemm_impl.cuh).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"

namespace dgemma::kernels {

// cudaFuncSetAttribute (the kernel's dynamic shared memory) once per device and kernel, not on every call.
template <class Kernel>
cudaError_t prepare_cutlass_kernel(int device) {
  static std::atomic<uint64_t> ready{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (ready.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  constexpr int smem = Kernel::SharedStorageSize;
  if (smem >= (48 << 10)) {
    const cudaError_t err =
        cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  ready.fetch_or(bit, std::memory_order_acq_rel);
  return cudaSuccess;
}

// One launch of a CUTLASS 3 GEMM (G::Gemm, a GemmUniversalAdapter of G::Kernel) for `args`: the host work is the
// kernel parameters (its TMA descriptors) and the launch; nothing is synchronised.
template <class G>
cudaError_t run_cutlass(const typename G::Gemm::Arguments& args, void* workspace, size_t workspace_bytes, int device,
                        cudaStream_t stream) {
  if (workspace_bytes < G::Gemm::get_workspace_size(args)) return cudaErrorInvalidValue;
  if (G::Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  const cudaError_t err = prepare_cutlass_kernel<typename G::Kernel>(device);
  if (err != cudaSuccess) return err;
  if (G::Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess)
    return cudaErrorInvalidConfiguration;
  typename G::Kernel::Params params = G::Kernel::to_underlying_arguments(args, workspace);
  if (G::Gemm::run(params, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
