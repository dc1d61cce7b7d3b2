// Explicit instantiation of the wgmma attention kernel for head_dim 256 (one per file: builds parallelise).
#include "kernels/sm90_attention_wgmma.cuh"

namespace dgemma::kernels {
template cudaError_t attention_wgmma<256>(const AttentionParams&, cudaStream_t);
}  // namespace dgemma::kernels
