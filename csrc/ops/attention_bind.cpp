// Python bindings of the attention domain (filled in with its kernels).
#include "ops/registry.h"

namespace dgemma {

void register_attention(pybind11::module_& m) { (void)m; }

}  // namespace dgemma
