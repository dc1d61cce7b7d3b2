// One registration function per domain, each defined in csrc/ops/<domain>_bind.cpp.
#pragma once

#include <pybind11/pybind11.h>

#include "ops/tensor_arg.h"

namespace dgemma {

// Builds a TensorArg from any object exposing torch's tensor attributes (data_ptr, dtype, shape,
// stride, device); `name` is used in error messages.
TensorArg to_arg(const pybind11::handle& t, const char* name);

// An optional tensor argument: nullptr for None, else `slot` filled by to_arg (the caller keeps
// `slot` alive for as long as the pointer is used).
const TensorArg* optional_arg(const pybind11::handle& t, const char* name, TensorArg& slot);

void register_moe(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_vocab_head(pybind11::module_& m);

}  // namespace dgemma
