// Explicit instantiation of the wgmma attention kernel for head_dim 512 (one per file: builds parallelise).
#include "kernels/sm90_attention_wgmma.cuh"

namespace dgemma::kernels {
template cudaError_t attention_wgmma<512>(const AttentionParams&, cudaStream_t);
}  // namespace dgemma::kernels
