// Python bindings of the vocab_head domain (filled in with its kernels).
#include "ops/registry.h"

namespace dgemma {

void register_vocab_head(pybind11::module_& m) { (void)m; }

}  // namespace dgemma
