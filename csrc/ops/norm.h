#pragma once

#include <cstdint>

#include "ops/tensor_arg.h"

namespace dgemma {

// y[..., d] = rms_norm(x[..., d]) [* weight[d]]; weight may be absent (weightless variant).
// x and y: same dtype (float32 or bfloat16), same shape, last dimension contiguous; rows may be strided.
void rms_norm(const TensorArg& x, const TensorArg* weight, const TensorArg& y, double eps, std::uintptr_t stream);

}  // namespace dgemma
