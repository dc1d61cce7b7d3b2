// Explicit instantiation of the deep-pipeline wgmma attention kernel for head_dim 256 (DGEMMA_ATTENTION=wgmma_deep;
// one per file: builds parallelise).
// Its 48-key tiles multiply on an m64n48k16 wgmma, one of CuTe's extended shapes (declared only with this defined
// before CuTe is included).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include "kernels/sm90_attention_wgmma.cuh"

namespace dgemma::kernels {
template cudaError_t attention_wgmma<256, true>(const AttentionParams&, cudaStream_t);
}  // namespace dgemma::kernels
