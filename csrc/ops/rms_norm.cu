#include <stdexcept>
#include <string>

#include "kernels/rms_norm.cuh"
#include "ops/norm.h"

namespace dgemma {
namespace {

// Rows of x/y are the leading dimensions flattened; they must be evenly strided for one row stride.
int64_t row_stride(const TensorArg& t) {
  const size_t nd = t.shape.size();
  if (t.strides[nd - 1] != 1) ::dgemma::throw_invalid(t.name + " must be contiguous in its last dimension");
  if (nd == 1) return t.shape[0];
  int64_t expected = t.strides[nd - 2];
  for (int i = static_cast<int>(nd) - 2; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected)
      ::dgemma::throw_invalid(t.name + " (shape " + t.shape_str() +
                                  ") must have uniformly strided rows; call .contiguous() first");
    expected *= t.shape[i];
  }
  return t.strides[nd - 2];
}

void throw_if_failed(cudaError_t err, const char* what) {
  if (err != cudaSuccess) ::dgemma::throw_runtime(std::string(what) + " failed: " + cudaGetErrorString(err));
}

}  // namespace

void rms_norm(const TensorArg& x, const TensorArg* weight, const TensorArg& y, double eps, std::uintptr_t stream) {
  check_cuda(x);
  check_cuda(y);
  check_same_device(x, y);
  check_same_dtype(x, y);
  if (x.shape.empty()) ::dgemma::throw_invalid(x.name + " must have at least one dimension");
  if (x.shape != y.shape)
    ::dgemma::throw_invalid(y.name + " has shape " + y.shape_str() + ", expected " + x.shape_str());
  const int64_t dim = x.shape.back();
  if (dim <= 0 || dim > (1 << 20))
    ::dgemma::throw_invalid(x.name + " last dimension " + std::to_string(dim) + " must be in [1, 1048576]");
  if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  if (weight != nullptr) {
    check_cuda(*weight);
    check_same_device(x, *weight);
    check_same_dtype(x, *weight);
    check_ndim(*weight, 1);
    check_dim(*weight, 0, dim, "the normalised dimension");
    check_contiguous(*weight);
  }
  const int64_t rows = x.numel() / dim;
  const int64_t xs = row_stride(x);
  const int64_t ys = row_stride(y);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  const int d = static_cast<int>(dim);
  const float e = static_cast<float>(eps);
  switch (x.dtype) {
    case DType::kFloat32:
      throw_if_failed(kernels::rms_norm(static_cast<const float*>(x.data),
                                        weight ? static_cast<const float*>(weight->data) : nullptr,
                                        static_cast<float*>(y.data), rows, d, xs, ys, e, s),
                      "rms_norm launch");
      break;
    case DType::kBFloat16:
      throw_if_failed(kernels::rms_norm(static_cast<const __nv_bfloat16*>(x.data),
                                        weight ? static_cast<const __nv_bfloat16*>(weight->data) : nullptr,
                                        static_cast<__nv_bfloat16*>(y.data), rows, d, xs, ys, e, s),
                      "rms_norm launch");
      break;
    default:
      ::dgemma::throw_invalid(x.name + " has dtype " + dtype_name(x.dtype) + ", expected float32 or bfloat16");
  }
}

}  // namespace dgemma
