// Validation and workspace helpers shared by the moe-domain launchers (moe.cu, fp8_linear.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "ops/tensor_arg.h"

namespace dgemma::moe_detail {

inline void throw_if_failed(cudaError_t err, const char* what) {
  if (err != cudaSuccess) ::dgemma::throw_runtime(std::string(what) + " failed: " + cudaGetErrorString(err));
}

// A CUDA tensor of `dtype`, shape [d0, d1] (d1 < 0: any), contiguous.
inline void check_matrix(const TensorArg& t, DType dtype, int64_t d0, int64_t d1, const char* w0, const char* w1) {
  check_cuda(t);
  check_dtype(t, dtype);
  check_ndim(t, 2);
  if (d0 >= 0) check_dim(t, 0, d0, w0);
  if (d1 >= 0) check_dim(t, 1, d1, w1);
  check_contiguous(t);
}

inline void check_aligned(const TensorArg& t, size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(t.data) % bytes != 0)
    ::dgemma::throw_invalid(t.name + " must be " + std::to_string(bytes) + "-byte aligned");
}

inline int64_t element_bytes(DType d) {
  switch (d) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kBFloat16: case DType::kFloat16: return 2;
    case DType::kInt64: return 8;
    default: return 1;
  }
}

// Whether two tensors' memory ranges (first to last element; contiguous or not) share any byte.
inline bool overlaps(const TensorArg& a, const TensorArg& b) {
  auto span = [](const TensorArg& t) {
    const char* lo = static_cast<const char*>(t.data);
    int64_t last = 0;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.shape[i] == 0) return std::make_pair(lo, lo);
      last += (t.shape[i] - 1) * t.strides[i];
    }
    return std::make_pair(lo, lo + (last + 1) * element_bytes(t.dtype));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

inline void check_multiple(int64_t v, int64_t m, const std::string& what) {
  if (v <= 0 || v % m != 0)
    ::dgemma::throw_invalid(what + " is " + std::to_string(v) + ", expected a positive multiple of " +
                                std::to_string(m));
}

inline int sm_count(int device) {
  int n = 0;
  throw_if_failed(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}

// Carves 256-byte aligned regions out of one workspace; with base == nullptr it only measures.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(size_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += (count * sizeof(T) + 255) & ~size_t(255);
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

inline void check_workspace(const TensorArg& ws, size_t needed, int device) {
  check_cuda(ws);
  if (ws.device != device)
    ::dgemma::throw_invalid(ws.name + " is on cuda:" + std::to_string(ws.device) + ", expected cuda:" +
                                std::to_string(device));
  check_dtype(ws, DType::kUInt8);
  check_contiguous(ws);
  check_aligned(ws, 256);
  if (static_cast<size_t>(ws.numel()) < needed)
    ::dgemma::throw_invalid(ws.name + " has " + std::to_string(ws.numel()) + " bytes, expected at least " +
                                std::to_string(needed));
}

}  // namespace dgemma::moe_detail
