// Argument checks shared by the attention launchers (attention.cu, qkv_prep.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "ops/tensor_arg.h"

namespace dgemma::attention_checks {

// A bf16 CUDA tensor of `ndim` dims on `device` whose last dim is contiguous and whose other strides
// and data pointer allow 16-byte vector access.
inline void check_bf16_rows(const TensorArg& t, size_t ndim, int device) {
  check_cuda(t);
  check_dtype(t, DType::kBFloat16);
  check_ndim(t, ndim);
  if (t.device != device)
    ::dgemma::throw_invalid(t.name + " is on cuda:" + std::to_string(t.device) + ", expected cuda:" +
                                std::to_string(device));
  if (t.strides[ndim - 1] != 1 && t.shape[ndim - 1] != 1)
    ::dgemma::throw_invalid(t.name + " must be contiguous in its last dimension");
  for (size_t i = 0; i + 1 < ndim; ++i)
    if (t.strides[i] % 8 != 0 && t.shape[i] != 1)
      ::dgemma::throw_invalid(t.name + " stride " + std::to_string(t.strides[i]) + " of dimension " +
                                  std::to_string(i) + " must be a multiple of 8 elements (16 bytes)");
  if (reinterpret_cast<std::uintptr_t>(t.data) % 16 != 0)
    ::dgemma::throw_invalid(t.name + " data must be 16-byte aligned");
}

inline void check_shape(const TensorArg& t, std::initializer_list<int64_t> expected) {
  size_t i = 0;
  bool ok = t.shape.size() == expected.size();
  for (int64_t e : expected) ok = ok && t.shape[i++] == e;
  if (!ok) {
    std::string s = "[";
    i = 0;
    for (int64_t e : expected) s += (i++ ? ", " : "") + std::to_string(e);
    ::dgemma::throw_invalid(t.name + " has shape " + t.shape_str() + ", expected " + s + "]");
  }
}

inline void check_range(const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    ::dgemma::throw_invalid(std::string(name) + " = " + std::to_string(v) + " must be in [" + std::to_string(lo) +
                                ", " + std::to_string(hi) + "]");
}

inline void throw_if_failed(cudaError_t err, const char* what) {
  if (err != cudaSuccess) ::dgemma::throw_runtime(std::string(what) + " failed: " + cudaGetErrorString(err));
}

}  // namespace dgemma::attention_checks
