#pragma once

namespace dgemma {

struct DeviceCapability {
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
};

bool built_with_cuda();
int cuda_runtime_version();  // CUDART_VERSION the extension was compiled against, 0 without CUDA
DeviceCapability device_capability(int device);

}  // namespace dgemma
