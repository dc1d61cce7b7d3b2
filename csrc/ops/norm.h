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

// The ffn form of residual_norm (bfloat16) with its two branches read from the expert pipeline before its combine
// (moe_fp8(combine=false), the dense MLP as shared experts): down [*, d] bf16 holds each (token, slot) row's output,
// row_of [rows, slots] int32 its row (-1: none); a = the sum of slots [top_k, slots) (the dense MLP), b = the sum of
// slots [0, top_k) (the experts), each in slot order in fp32 rounded to bf16 as the combine would. d % 8 == 0,
// d <= 3072. q, q_scale, q_weight as in residual_norm.
void ffn_residual_experts(const TensorArg& x, const TensorArg& down, const TensorArg& row_of, int top_k,
                          const TensorArg& w_mlp, const TensorArg& w_moe, const TensorArg& w_ff,
                          const TensorArg& scalar, const TensorArg& out, double eps, std::uintptr_t stream,
                          const TensorArg* q_weight = nullptr, const TensorArg* q = nullptr,
                          const TensorArg* q_scale = nullptr);

// The decoder's input in one pass (csrc/kernels/residual_norm.cuh embed_norm_kernel): out = rms_norm(table[ids] *
// scale [+ add]) without a weight, each step rounded to bf16 as the reference rounds it. ids int64 (any shape,
// contiguous), table [vocab, d] bf16, add and out ids.shape + [d] bf16. With q and q_scale: also the per-row FP8
// quantisation of rms_norm(out) [* q_weight], as residual_norm writes it. An id outside the table gives a zero row.
void embed_norm(const TensorArg& ids, const TensorArg& table, double scale, const TensorArg* add,
                const TensorArg& out, double eps, std::uintptr_t stream, const TensorArg* q_weight = nullptr,
                const TensorArg* q = nullptr, const TensorArg* q_scale = nullptr);

}  // namespace dgemma
