// Explicit instantiation of the attention kernel for head_dim 512 (one per file: builds parallelise).
#include "kernels/sm90_attention_bf16.cuh"

namespace dgemma::kernels {
template cudaError_t attention_bf16<512>(const AttentionParams&, cudaStream_t);
}  // namespace dgemma::kernels
