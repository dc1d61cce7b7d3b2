#include <cmath>
#include <stdexcept>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/residual_norm.cuh"
#include "kernels/rms_norm.cuh"
#include "ops/moe_checks.h"
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

void check_like(const TensorArg& t, const TensorArg& ref) {
  check_cuda(t);
  check_same_device(ref, t);
  check_same_dtype(ref, t);
  if (t.shape != ref.shape)
    ::dgemma::throw_invalid(t.name + " has shape " + t.shape_str() + ", expected " + ref.shape_str() + " (as " +
                            ref.name + ")");
  check_contiguous(t);
}

void check_norm_weight(const TensorArg& w, const TensorArg& x, int64_t dim) {
  check_cuda(w);
  check_same_device(x, w);
  check_same_dtype(x, w);
  check_ndim(w, 1);
  check_dim(w, 0, dim, "the normalised dimension");
  check_contiguous(w);
}

// x's last dimension (the one normalised), checked with the epsilon.
int64_t normalised_dim(const TensorArg& x, double eps) {
  const int64_t dim = x.shape.back();
  if (dim <= 0 || dim > (1 << 20))
    ::dgemma::throw_invalid(x.name + " last dimension " + std::to_string(dim) + " must be in [1, 1048576]");
  if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  return dim;
}

// q [rows, dim] float8_e4m3fn and scale [rows] fp32, contiguous, on x's device: a quantised-rows output.
void check_quant_rows(const TensorArg& q, const TensorArg& scale, const TensorArg& x, int64_t rows, int64_t dim) {
  check_cuda(q);
  check_same_device(x, q);
  check_dtype(q, DType::kFloat8E4M3);
  check_ndim(q, 2);
  check_dim(q, 0, rows, "rows of x");
  check_dim(q, 1, dim, "the normalised dimension");
  check_contiguous(q);
  check_vector(scale, DType::kFloat32, rows, "rows of x", x);
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
  const int64_t dim = normalised_dim(x, eps);
  if (weight != nullptr) check_norm_weight(*weight, x, dim);
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

void rms_norm_fp8(const TensorArg& x, const TensorArg* weight, const TensorArg& q, const TensorArg& scale, double eps,
                  std::uintptr_t stream) {
  check_cuda(x);
  check_dtype(x, DType::kBFloat16);
  if (x.shape.empty()) ::dgemma::throw_invalid(x.name + " must have at least one dimension");
  const int64_t dim = normalised_dim(x, eps);
  const int64_t rows = x.numel() / dim;
  const int64_t xs = row_stride(x);
  if (weight != nullptr) check_norm_weight(*weight, x, dim);
  check_quant_rows(q, scale, x, rows, dim);
  if (rows >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(x.name + " has " + std::to_string(rows) + " rows, expected < 2^31");
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  throw_if_failed(kernels::rms_norm_fp8(static_cast<const __nv_bfloat16*>(x.data),
                                        weight ? static_cast<const __nv_bfloat16*>(weight->data) : nullptr,
                                        static_cast<uint8_t*>(q.data), static_cast<float*>(scale.data), rows,
                                        static_cast<int>(dim), xs, static_cast<float>(eps),
                                        reinterpret_cast<cudaStream_t>(stream)),
                  "rms_norm_fp8 launch");
}


namespace {

// Both residual launchers: checks everything but the branch inputs (a, b or the expert rows), then launches.
void launch_residual(const TensorArg& x, const TensorArg* a, const TensorArg* b, const TensorArg& wa,
                     const TensorArg* wb, const TensorArg* wc, const TensorArg* scalar, const TensorArg& out,
                     double eps, std::uintptr_t stream, const TensorArg* q_weight, const TensorArg* q,
                     const TensorArg* q_scale, const kernels::ExpertBranches& eb, int64_t dim) {
  // Rows are re-read after out is written (the quantising passes recompute from the inputs): never in place.
  for (const TensorArg* in : {&x, a, b})
    if (in != nullptr && moe_detail::overlaps(out, *in))
      ::dgemma::throw_invalid(out.name + " must not overlap " + in->name + " (the kernel reads it after writing out)");
  check_norm_weight(wa, x, dim);
  const bool ffn = b != nullptr || eb.down != nullptr;
  if (ffn != (wb != nullptr) || ffn != (wc != nullptr) || ffn != (scalar != nullptr))
    ::dgemma::throw_invalid("b, wb, wc and scalar must be given together (or none of them)");
  if (ffn) {
    if (b != nullptr) check_like(*b, x);
    check_norm_weight(*wb, x, dim);
    check_norm_weight(*wc, x, dim);
    check_cuda(*scalar);
    check_same_device(x, *scalar);
    check_same_dtype(x, *scalar);
    if (scalar->numel() != 1)
      ::dgemma::throw_invalid(scalar->name + " has shape " + scalar->shape_str() + ", expected one element");
  }
  const int64_t rows = x.numel() / dim;
  if (q != nullptr || q_scale != nullptr || q_weight != nullptr) {
    if (q == nullptr || q_scale == nullptr)
      ::dgemma::throw_invalid("q and q_scale must be given together (q_weight with them, or neither)");
    if (x.dtype != DType::kBFloat16)
      ::dgemma::throw_invalid(x.name + " has dtype " + dtype_name(x.dtype) + ": q needs bfloat16");
    if (q_weight != nullptr) check_norm_weight(*q_weight, x, dim);
    check_quant_rows(*q, *q_scale, x, rows, dim);
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  throw_if_failed(cudaSetDevice(x.device), "cudaSetDevice");
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto p = [](const TensorArg* t) { return t != nullptr ? static_cast<const T*>(t->data) : nullptr; };
    kernels::ResidualQuant<T> quant;
    if (q != nullptr) {
      quant.weight = p(q_weight);
      quant.q = static_cast<uint8_t*>(q->data);
      quant.scale = static_cast<float*>(q_scale->data);
    }
    throw_if_failed(kernels::residual_norm<T>(p(&x), p(a), p(b), p(&wa), p(wb), p(wc), p(scalar),
                                              static_cast<T*>(out.data), rows, static_cast<int>(dim),
                                              static_cast<float>(eps), s, quant, eb),
                    "residual_norm launch");
  };
  if (x.dtype == DType::kFloat32)
    launch(float{});
  else
    launch(__nv_bfloat16{});
}

// The residual stream x: float32 or bfloat16, at least one dimension, contiguous.
void check_residual_stream(const TensorArg& x) {
  check_cuda(x);
  if (x.dtype != DType::kFloat32 && x.dtype != DType::kBFloat16)
    ::dgemma::throw_invalid(x.name + " has dtype " + dtype_name(x.dtype) + ", expected float32 or bfloat16");
  if (x.shape.empty()) ::dgemma::throw_invalid(x.name + " must have at least one dimension");
  check_contiguous(x);
}

}  // namespace

void residual_norm(const TensorArg& x, const TensorArg& a, const TensorArg* b, const TensorArg& wa,
                   const TensorArg* wb, const TensorArg* wc, const TensorArg* scalar, const TensorArg& out,
                   double eps, std::uintptr_t stream, const TensorArg* q_weight, const TensorArg* q,
                   const TensorArg* q_scale) {
  check_residual_stream(x);
  check_like(a, x);
  check_like(out, x);
  const int64_t dim = normalised_dim(x, eps);
  launch_residual(x, &a, b, wa, wb, wc, scalar, out, eps, stream, q_weight, q, q_scale, {}, dim);
}

void ffn_residual_experts(const TensorArg& x, const TensorArg& down, const TensorArg& row_of, int top_k,
                          const TensorArg& w_mlp, const TensorArg& w_moe, const TensorArg& w_ff,
                          const TensorArg& scalar, const TensorArg& out, double eps, std::uintptr_t stream,
                          const TensorArg* q_weight, const TensorArg* q, const TensorArg* q_scale) {
  check_residual_stream(x);
  check_like(out, x);
  const int64_t dim = normalised_dim(x, eps);
  if (x.dtype != DType::kBFloat16)
    ::dgemma::throw_invalid(x.name + " has dtype " + dtype_name(x.dtype) +
                            ", expected bfloat16 (the expert rows' dtype)");
  if (dim % 8 != 0 || dim > kernels::kExpertBranchesMaxDim)
    ::dgemma::throw_invalid(x.name + " last dimension is " + std::to_string(dim) + ", expected a multiple of 8 up to " +
                            std::to_string(kernels::kExpertBranchesMaxDim));
  const int64_t rows = x.numel() / dim;
  moe_detail::check_matrix(down, DType::kBFloat16, -1, dim, "", "the normalised dimension");
  check_same_device(x, down);
  moe_detail::check_aligned(down, 16);
  moe_detail::check_matrix(row_of, DType::kInt32, rows, -1, "rows of x", "");
  check_same_device(x, row_of);
  const int64_t slots = row_of.shape[1];
  if (top_k < 1 || top_k >= slots)
    ::dgemma::throw_invalid("top_k is " + std::to_string(top_k) + ", expected 1.." + std::to_string(slots - 1) +
                            " (the routed slots of " + row_of.name + "'s " + std::to_string(slots) +
                            "; the rest are the dense MLP's)");
  if (kernels::residual_kernel_setting() < 0) {
    const char* name = std::getenv("DGEMMA_RESIDUAL_KERNEL");
    ::dgemma::throw_invalid(std::string("DGEMMA_RESIDUAL_KERNEL=") + (name != nullptr ? name : "") +
                            " is not a residual kernel (block or warp)");
  }
  kernels::ExpertBranches eb;
  eb.down = static_cast<const __nv_bfloat16*>(down.data);
  eb.row_of = static_cast<const int32_t*>(row_of.data);
  eb.slots = static_cast<int>(slots);
  eb.top_k = top_k;
  launch_residual(x, nullptr, nullptr, w_mlp, &w_moe, &w_ff, &scalar, out, eps, stream, q_weight, q, q_scale, eb, dim);
}

void embed_norm(const TensorArg& ids, const TensorArg& table, double scale, const TensorArg* add,
                const TensorArg& out, double eps, std::uintptr_t stream, const TensorArg* q_weight,
                const TensorArg* q, const TensorArg* q_scale) {
  check_cuda(table);
  check_dtype(table, DType::kBFloat16);
  check_ndim(table, 2);
  check_contiguous(table);
  const int64_t vocab = table.shape[0], dim = table.shape[1];
  if (dim < 1 || dim > (1 << 20))
    ::dgemma::throw_invalid(table.name + " row length " + std::to_string(dim) + " must be in [1, 1048576]");
  check_cuda(ids);
  check_same_device(table, ids);
  check_dtype(ids, DType::kInt64);
  check_contiguous(ids);
  const int64_t rows = ids.numel();
  // out: ids' shape + [dim], bf16, contiguous.
  std::vector<int64_t> shape = ids.shape;
  shape.push_back(dim);
  check_cuda(out);
  check_same_device(table, out);
  check_dtype(out, DType::kBFloat16);
  if (out.shape != shape) {
    TensorArg expected;
    expected.shape = shape;
    ::dgemma::throw_invalid(out.name + " has shape " + out.shape_str() + ", expected " + expected.shape_str() +
                            " (ids' shape and the table's row length)");
  }
  check_contiguous(out);
  if (add != nullptr) {
    check_like(*add, out);
    if (moe_detail::overlaps(out, *add))
      ::dgemma::throw_invalid(out.name + " must not overlap " + add->name + " (the kernel reads it after writing out)");
  }
  if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  if (!std::isfinite(scale)) ::dgemma::throw_invalid("scale must be finite, got " + std::to_string(scale));
  kernels::ResidualQuant<__nv_bfloat16> quant;
  if (q != nullptr || q_scale != nullptr || q_weight != nullptr) {
    if (q == nullptr || q_scale == nullptr)
      ::dgemma::throw_invalid("q and q_scale must be given together (q_weight with them, or neither)");
    if (q_weight != nullptr) check_norm_weight(*q_weight, out, dim);
    check_quant_rows(*q, *q_scale, out, rows, dim);
    quant.weight = q_weight != nullptr ? static_cast<const __nv_bfloat16*>(q_weight->data) : nullptr;
    quant.q = static_cast<uint8_t*>(q->data);
    quant.scale = static_cast<float*>(q_scale->data);
  }
  if (rows >= (int64_t(1) << 31))
    ::dgemma::throw_invalid(ids.name + " has " + std::to_string(rows) + " ids, expected < 2^31");
  throw_if_failed(cudaSetDevice(table.device), "cudaSetDevice");
  throw_if_failed(kernels::embed_norm(static_cast<const int64_t*>(ids.data),
                                      static_cast<const __nv_bfloat16*>(table.data), vocab,
                                      static_cast<float>(scale),
                                      add != nullptr ? static_cast<const __nv_bfloat16*>(add->data) : nullptr,
                                      static_cast<__nv_bfloat16*>(out.data), rows, static_cast<int>(dim),
                                      static_cast<float>(eps), reinterpret_cast<cudaStream_t>(stream), quant),
                  "embed_norm launch");
}

}  // namespace dgemma
