// Programmatic dependent launch (PDL, sm_90): a kernel launched with it may be scheduled while the kernel before it
// on the stream is still running, so the launch latency and the ramp-up of consecutive kernels overlap.
//
// The contract every dgemma kernel keeps: its first statement is pdl_begin(), which waits until the kernels before
// it on the stream have completed and their writes are visible to this grid (so nothing it reads or writes can race
// them), then allows the kernel after it to be scheduled (that kernel waits in its own pdl_begin()). Without the
// launch attribute both instructions do nothing, so a kernel behaves the same either way. The CUTLASS GEMMs keep the
// same contract through CUTLASS's own grid dependency control (CUTLASS_ENABLE_GDC_FOR_SM90; the expert GEMM's tile
// scheduler waits before it reads the plan's tables).
//
// PDL is opt-in (DGEMMA_PDL=1, read once per process) until a GPU run has measured it.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dgemma::kernels {

// Waits until the kernels before this one on the stream have completed and their writes are visible.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Set when a launch with the PDL attribute failed and the same launch without it succeeded (e.g. a stream that does
// not take it): from then on this process launches without it.
inline std::atomic<bool>& pdl_refused() {
  static std::atomic<bool> refused{false};
  return refused;
}

// Whether dgemma's launches carry the PDL attribute (DGEMMA_PDL=1, and not refused).
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DGEMMA_PDL");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on && !pdl_refused().load(std::memory_order_relaxed);
}

// Runs launch(with_pdl) with the attribute when enabled; if that fails and the launch without it succeeds, PDL is
// refused for the rest of the process. Returns the error of the last try (cleared from the runtime's error state).
template <typename Launch>
cudaError_t launch_with_pdl_fallback(Launch&& launch) {
  const bool pdl = pdl_enabled();
  cudaError_t err = launch(pdl);
  if (err != cudaSuccess) (void)cudaGetLastError();
  if (err != cudaSuccess && pdl) {
    err = launch(false);
    if (err != cudaSuccess)
      (void)cudaGetLastError();
    else
      pdl_refused().store(true, std::memory_order_relaxed);
  }
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...) in thread-block clusters of `cluster` blocks (dim3(1, 1, 1): no
// cluster), with the PDL attribute when pdl_enabled(). Returns the launch's error (and clears it, so that it is
// reported once).
template <typename... Params, typename... Args>
cudaError_t launch_kernel_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, dim3 cluster, const Args&... args) {
  return launch_with_pdl_fallback([&](bool pdl) {
    cudaLaunchAttribute attr[2];
    unsigned n = 0;
    if (cluster.x * cluster.y * cluster.z > 1) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = cluster.x;
      attr[n].val.clusterDim.y = cluster.y;
      attr[n].val.clusterDim.z = cluster.z;
      ++n;
    }
    if (pdl) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n].val.programmaticStreamSerializationAllowed = 1;
      ++n;
    }
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
  });
}

// Lets Kernel use `bytes` of dynamic shared memory on `device` (-1: the current device, which must be `device` when
// one is given): cudaFuncSetAttribute only when that device has not yet been allowed as much (the attribute is per function and device, and is only ever raised, so a launch
// that needs less never undoes a larger one). The common case is one atomic load, not a driver call per launch.
template <auto Kernel>
cudaError_t allow_dynamic_smem(size_t bytes, int device = -1) {
  constexpr int kDevices = 64;
  static std::atomic<int> allowed[kDevices];  // static storage: zero
  static std::mutex mutex;
  if (bytes <= (48u << 10)) return cudaSuccess;  // within the default limit
  cudaError_t err = device < 0 ? cudaGetDevice(&device) : cudaSuccess;
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kDevices)
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (allowed[device].load(std::memory_order_acquire) >= static_cast<int64_t>(bytes)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mutex);
  if (allowed[device].load(std::memory_order_relaxed) >= static_cast<int64_t>(bytes)) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) allowed[device].store(static_cast<int>(bytes), std::memory_order_release);
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_enabled(). Returns the launch's
// error (and clears it, so that it is reported once).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
  return launch_kernel_clustered(kernel, grid, block, smem, stream, dim3(1, 1, 1), args...);
}

// launch_kernel of Kernel with `smem` bytes of dynamic shared memory, allowed first (allow_dynamic_smem).
template <auto Kernel, typename... Args>
cudaError_t launch_kernel_smem(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  const cudaError_t err = allow_dynamic_smem<Kernel>(smem);
  return err != cudaSuccess ? err : launch_kernel(Kernel, grid, block, smem, stream, args...);
}

}  // namespace dgemma::kernels
