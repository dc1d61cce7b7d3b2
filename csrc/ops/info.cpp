#include "ops/info.h"

#ifdef DGEMMA_WITH_CUDA
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>

namespace dgemma {

bool built_with_cuda() {
#ifdef DGEMMA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_runtime_version() {
#ifdef DGEMMA_WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

DeviceCapability device_capability(int device) {
#ifdef DGEMMA_WITH_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  if (device < 0 || device >= count) {
    throw std::invalid_argument("device " + std::to_string(device) + " out of range: " + std::to_string(count) +
                                " CUDA device(s) visible");
  }
  DeviceCapability cap;
  cudaDeviceGetAttribute(&cap.major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&cap.minor, cudaDevAttrComputeCapabilityMinor, device);
  cudaDeviceGetAttribute(&cap.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  return cap;
#else
  (void)device;
  throw std::runtime_error("dgemma was built without CUDA (no CUDA toolkit at build time)");
#endif
}

}  // namespace dgemma
