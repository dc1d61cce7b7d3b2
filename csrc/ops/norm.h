#pragma once

#include <cstdint>

#include "ops/tensor_arg.h"

namespace dgemma {

// y[..., d] = rms_norm(x[..., d]) [* weight[d]]; weight may be absent (weightless variant).
// x and y: same dtype (float32 or bfloat16), same shape, last dimension contiguous; rows may be strided.
void rms_norm(const TensorArg& x, const TensorArg* weight, const TensorArg& y, double eps, std::uintptr_t stream);

// The input of an FP8 GEMM: q [rows, d] float8_e4m3fn and scale [rows] fp32 = per-row quantisation of
// rms_norm(x) [* weight] (x bfloat16, rows = x's leading dimensions flattened), bit-identical to rms_norm followed by
// fp8_quantize_rows.
void rms_norm_fp8(const TensorArg& x, const TensorArg* weight, const TensorArg& q, const TensorArg& scale, double eps,
                  std::uintptr_t stream);

// The residual updates of a layer, each one pass (csrc/kernels/residual_norm.cuh), rounded like the reference:
//   b absent:  out = x + rms_norm(a) * wa
//   b given:   out = (x + rms_norm(rms_norm(a) * wa + rms_norm(b) * wb) * wc) * scalar
// x, a, b, out: same dtype (float32 or bfloat16), same shape, contiguous; wa, wb, wc: [last dim] of that dtype;
// scalar: one element of that dtype.
// With q and q_scale (bfloat16, either form): also q [rows, d] float8_e4m3fn and q_scale [rows] fp32, the per-row
// quantisation of rms_norm(out) [* q_weight], bit-identical to rms_norm_fp8 of out.
void residual_norm(const TensorArg& x, const TensorArg& a, const TensorArg* b, const TensorArg& wa,
                   const TensorArg* wb, const TensorArg* wc, const TensorArg* scalar, const TensorArg& out,
                   double eps, std::uintptr_t stream, const TensorArg* q_weight = nullptr,
                   const TensorArg* q = nullptr, const TensorArg* q_scale = nullptr);

}  // namespace dgemma
