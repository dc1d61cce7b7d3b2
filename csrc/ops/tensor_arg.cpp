#include "ops/tensor_arg.h"

namespace dgemma {

void throw_invalid(const std::string& message) { throw std::invalid_argument(message); }

void throw_runtime(const std::string& message) { throw std::runtime_error(message); }

void cuda_unavailable(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": dgemma was built without CUDA (no CUDA toolkit at build time); reinstall on a machine "
                           "with nvcc");
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
    default: return "unsupported";
  }
}

void check_cuda(const TensorArg& t) {
  if (t.device < 0) throw std::invalid_argument(t.name + " must be a CUDA tensor, got a CPU tensor");
}

void check_dtype(const TensorArg& t, DType expected) {
  if (t.dtype != expected)
    throw std::invalid_argument(t.name + " has dtype " + dtype_name(t.dtype) + ", expected " + dtype_name(expected));
}

void check_same_dtype(const TensorArg& a, const TensorArg& b) {
  if (a.dtype != b.dtype)
    throw std::invalid_argument(b.name + " has dtype " + dtype_name(b.dtype) + ", expected " + dtype_name(a.dtype) +
                                " (the dtype of " + a.name + ")");
}

void check_same_device(const TensorArg& a, const TensorArg& b) {
  if (a.device != b.device)
    throw std::invalid_argument(b.name + " is on cuda:" + std::to_string(b.device) + ", expected cuda:" +
                                std::to_string(a.device) + " (the device of " + a.name + ")");
}

void check_contiguous(const TensorArg& t) {
  if (!t.is_contiguous()) throw std::invalid_argument(t.name + " must be contiguous (shape " + t.shape_str() + ")");
}

void check_ndim(const TensorArg& t, size_t ndim) {
  if (t.shape.size() != ndim)
    throw std::invalid_argument(t.name + " has shape " + t.shape_str() + ", expected " + std::to_string(ndim) +
                                " dimensions");
}

void check_dim(const TensorArg& t, size_t dim, int64_t expected, const char* what) {
  if (dim >= t.shape.size() || t.shape[dim] != expected)
    throw std::invalid_argument(t.name + " has shape " + t.shape_str() + ", expected size " +
                                std::to_string(expected) + " in dimension " + std::to_string(dim) + " (" + what + ")");
}

void check_vector(const TensorArg& t, DType dtype, int64_t n, const char* what, const TensorArg& like) {
  check_cuda(t);
  check_same_device(like, t);
  check_dtype(t, dtype);
  check_ndim(t, 1);
  check_dim(t, 0, n, what);
  check_contiguous(t);
}

}  // namespace dgemma
