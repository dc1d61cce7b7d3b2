// Entry points of a build without a CUDA toolkit: they exist, so the Python API is the same in every
// build, and say why they cannot run.
#include "ops/norm.h"

namespace dgemma {
void rms_norm(const TensorArg&, const TensorArg*, const TensorArg&, double, std::uintptr_t) { cuda_unavailable("rms_norm"); }
void rms_norm_fp8(const TensorArg&, const TensorArg*, const TensorArg&, const TensorArg&, double, std::uintptr_t) {
  cuda_unavailable("rms_norm_fp8");
}
void residual_norm(const TensorArg&, const TensorArg&, const TensorArg*, const TensorArg&, const TensorArg*,
                   const TensorArg*, const TensorArg*, const TensorArg&, double, std::uintptr_t, const TensorArg*,
                   const TensorArg*, const TensorArg*) {
  cuda_unavailable("residual_norm");
}
void ffn_residual_experts(const TensorArg&, const TensorArg&, const TensorArg&, int, const TensorArg&, const TensorArg&,
                          const TensorArg&, const TensorArg&, const TensorArg&, double, std::uintptr_t, const TensorArg*,
                          const TensorArg*, const TensorArg*) {
  cuda_unavailable("ffn_residual_experts");
}
void embed_norm(const TensorArg&, const TensorArg&, double, const TensorArg*, const TensorArg&, double, std::uintptr_t,
                const TensorArg*, const TensorArg*, const TensorArg*) {
  cuda_unavailable("embed_norm");
}

}  // namespace dgemma
