// Entry points of a build without a CUDA toolkit: they exist, so the Python API is the same in every
// build, and say why they cannot run.
#include <stdexcept>
#include <string>

#include "ops/norm.h"

namespace dgemma {
namespace {

[[noreturn]] void unavailable(const char* op) {
  throw std::runtime_error(std::string(op) + ": dgemma was built without CUDA (no CUDA toolkit at build time)");
}

}  // namespace

void rms_norm(const TensorArg&, const TensorArg*, const TensorArg&, double, std::uintptr_t) { unavailable("rms_norm"); }

}  // namespace dgemma
