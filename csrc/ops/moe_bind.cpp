// Python bindings of the moe domain (filled in with its kernels).
#include "ops/registry.h"

namespace dgemma {

void register_moe(pybind11::module_& m) { (void)m; }

}  // namespace dgemma
