// The MoE experts' FP8 GEMM over a contiguous, tile-padded layout: the torch-free, CUTLASS-free contract.
//
// Routed rows are sorted by expert and each expert's rows padded to a multiple of the token tile (the dispatch
// plan, moe_dispatch.cuh, with pad = the tile), so every token tile belongs to one expert: tile_expert[t]. One
// kernel covers every expert: a persistent, warp-specialised TMA + wgmma GEMM whose work tiles are (weight tile,
// token tile) pairs, the expert a coordinate of one TMA descriptor over the whole weight stack [experts, n_out, k]
// (no per-expert descriptors or argument arrays; nothing computed on the host but the launch parameters).
//
//   out[r, c] = bf16( (sum_k x[r, k] * w[e, c, k]) * row_scale[r] * w_scale[e, c] ),  e = tile_expert[r / tile]
//
// Operands are swapped as in the other FP8 GEMMs (weights are CUTLASS's M, tokens its N). Rows past the plan's
// padded total (*num_tiles tiles) are not computed; padding rows inside a tile are computed and ignored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/moe_plan_limits.h"

namespace dgemma::kernels {

struct MoeGemmProblem {
  int experts = 0;
  int n_out = 0;  // weight rows per expert; a multiple of 8
  int k = 0;      // a multiple of 16
  const uint8_t* w = nullptr;      // [experts, n_out, k] fp8, contiguous, 16-byte aligned
  const float* w_scale = nullptr;  // [experts, n_out]
  const uint8_t* x = nullptr;      // [rows_cap, k] fp8, row-major, 16-byte aligned
  const float* row_scale = nullptr;  // [rows_cap]
  int rows_cap = 0;                  // rows allocated: a multiple of the tile, >= the plan's padded total
  const int32_t* tile_expert = nullptr;  // [rows_cap / tile]
  const int32_t* num_tiles = nullptr;    // one int on the device: token tiles in use
  __nv_bfloat16* out = nullptr;          // [rows_cap, ldo] bf16, 16-byte aligned
  int64_t ldo = 0;
};

// Token-tile widths compiled (one .cu file each): kMoeGemmTiles, and the choice by rows per expert,
// choose_moe_gemm_tile, in moe_plan_limits.h (host-only: the memory plan asks it too).

#define DGEMMA_DECLARE_MOE_GEMM(N)                                                                          \
  size_t sm90_moe_gemm_n##N##_workspace_bytes(const MoeGemmProblem& p, int sm_count, int device);            \
  cudaError_t sm90_moe_gemm_n##N(const MoeGemmProblem& p, void* workspace, size_t workspace_bytes, int sm_count, \
                                 int device, cudaStream_t stream);
DGEMMA_DECLARE_MOE_GEMM(32)
DGEMMA_DECLARE_MOE_GEMM(64)
DGEMMA_DECLARE_MOE_GEMM(128)
#undef DGEMMA_DECLARE_MOE_GEMM


inline size_t sm90_moe_gemm_workspace_bytes(int tile, const MoeGemmProblem& p, int sm_count, int device) {
  switch (tile) {
    case 32: return sm90_moe_gemm_n32_workspace_bytes(p, sm_count, device);
    case 64: return sm90_moe_gemm_n64_workspace_bytes(p, sm_count, device);
    default: return sm90_moe_gemm_n128_workspace_bytes(p, sm_count, device);
  }
}

inline cudaError_t sm90_moe_gemm(int tile, const MoeGemmProblem& p, void* workspace, size_t workspace_bytes,
                                 int sm_count, int device, cudaStream_t stream) {
  switch (tile) {
    case 32: return sm90_moe_gemm_n32(p, workspace, workspace_bytes, sm_count, device, stream);
    case 64: return sm90_moe_gemm_n64(p, workspace, workspace_bytes, sm_count, device, stream);
    case 128: return sm90_moe_gemm_n128(p, workspace, workspace_bytes, sm_count, device, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dgemma::kernels
