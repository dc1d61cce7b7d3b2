// A torch-free description of a tensor handed from Python to a launcher: pointer, dtype, shape,
// strides and device. The bindings build it from any object exposing torch's tensor attributes, so
// the extension never links libtorch and builds without it.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dgemma {

enum class DType { kFloat32, kBFloat16, kFloat16, kFloat8E4M3, kInt32, kInt64, kUInt8, kBool, kOther };

const char* dtype_name(DType d);

struct TensorArg {
  void* data = nullptr;
  DType dtype = DType::kOther;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  int device = -1;               // CUDA ordinal, -1 for host memory
  std::string name;              // argument name, used in error messages

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  bool is_contiguous() const {
    // An empty tensor is contiguous whatever its strides (as torch says): no element is out of place.
    for (int64_t extent : shape)
      if (extent == 0) return true;
    int64_t expected = 1;
    for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  std::string shape_str() const {
    std::ostringstream os;
    os << "[";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << "]";
    return os.str();
  }
};

// NOTE: code compiled by nvcc (the .cu launchers and the headers they include) raises through these,
// never with a throw expression of its own: on some toolchains an exception thrown from
// nvcc-compiled host code crashes the process, while one thrown from a g++-compiled function and
// unwinding through nvcc frames does not.
[[noreturn]] void throw_invalid(const std::string& message);  // std::invalid_argument -> ValueError
[[noreturn]] void throw_runtime(const std::string& message);  // std::runtime_error -> RuntimeError
// The entry points of a build without a CUDA toolkit raise this (RuntimeError naming `op`).
[[noreturn]] void cuda_unavailable(const char* op);

// Launcher-side checks. Each throws std::invalid_argument (Python: ValueError) naming the argument,
// the value found and what was expected.
void check_cuda(const TensorArg& t);
void check_dtype(const TensorArg& t, DType expected);
void check_same_dtype(const TensorArg& a, const TensorArg& b);
void check_same_device(const TensorArg& a, const TensorArg& b);
void check_contiguous(const TensorArg& t);
void check_ndim(const TensorArg& t, size_t ndim);
void check_dim(const TensorArg& t, size_t dim, int64_t expected, const char* what);
// A contiguous CUDA vector of `dtype` and n entries (`what` names n) on `like`'s device.
void check_vector(const TensorArg& t, DType dtype, int64_t n, const char* what, const TensorArg& like);

}  // namespace dgemma
