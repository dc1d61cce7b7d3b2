// FP8 (E4M3) grouped GEMM on Hopper: the torch-free, CUTLASS-free contract.
//
// Group g computes  D_g[rows_g, n_out] = X_g[rows_g, k] . W_g[n_out, k]^T  (fp32 accumulation, bf16
// out), with all per-group sizes, pointers and strides built on the device from row_offsets: the
// token counts per expert never travel to the host (no synchronisation; capturable in a CUDA graph).
// The product is unscaled; consumers of D apply the per-channel weight and per-token activation scales.
// The CUTLASS kernels live in sm90_fp8_grouped_gemm_impl.cuh, one token-tile width per .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

// Torch-free description of one grouped GEMM call. All pointers are device pointers.
struct Fp8GroupedGemmProblem {
  int groups = 0;
  int n_out = 0;  // weight rows per group (CUTLASS M)
  int k = 0;      // reduction length; a multiple of 16 (16-byte TMA alignment of fp8 rows)
  // Group g's weights [n_out, k] start at byte address weights + g * weight_group_stride.
  // NOTE: the stride is a byte distance between addresses and may join two separate allocations
  // (e.g. an MLP's gate and up projections as a 2-group problem); it is applied as an integer.
  const uint8_t* weights = nullptr;
  int64_t weight_group_stride = 0;
  // Activations [*, k] fp8, row-major. With row_offsets (device, groups + 1 entries) group g uses rows
  // row_offsets[g] .. row_offsets[g+1]-1; without, every group uses rows 0 .. rows-1.
  const uint8_t* activations = nullptr;
  const int* row_offsets = nullptr;
  int rows = 0;
  // Output: group g writes D_g(r, c) at out[(row_base_g + r) * ldo + g * out_group_stride + c], where
  // row_base_g = row_offsets[g] (or 0).
  __nv_bfloat16* out = nullptr;
  int64_t ldo = 0;
  int64_t out_group_stride = 0;
};

// Token-tile widths we instantiate (one .cu file each, so builds parallelise).
enum class Fp8GemmTile { kN32, kN64, kN128 };

// Entry points per token-tile width (defined in csrc/ops/fp8_grouped_gemm_n*.cu):
//   *_scratch_bytes   scratch of one call with `groups` groups;
//   *_args            write the per-group arguments of p1 and, when p2 is given, of p2 (one launch);
//   the GEMM itself   with args_ready, it uses the arguments *_args wrote into its scratch (on this stream).
#define DGEMMA_DECLARE_FP8_GROUPED_GEMM(N)                                                                   \
  size_t sm90_fp8_grouped_gemm_n##N##_scratch_bytes(int groups, int sm_count, int device);                   \
  cudaError_t sm90_fp8_grouped_gemm_n##N##_args(const Fp8GroupedGemmProblem& p1, void* scratch1, size_t bytes1, \
                                               const Fp8GroupedGemmProblem* p2, void* scratch2, size_t bytes2, \
                                               int sm_count, int device, cudaStream_t stream);              \
  cudaError_t sm90_fp8_grouped_gemm_n##N(const Fp8GroupedGemmProblem& p, void* scratch, size_t scratch_bytes,  \
                                         int sm_count, int device, cudaStream_t stream, bool args_ready);
DGEMMA_DECLARE_FP8_GROUPED_GEMM(32)
DGEMMA_DECLARE_FP8_GROUPED_GEMM(64)
DGEMMA_DECLARE_FP8_GROUPED_GEMM(128)
#undef DGEMMA_DECLARE_FP8_GROUPED_GEMM

inline size_t sm90_fp8_grouped_gemm_scratch_bytes(Fp8GemmTile tile, int groups, int sm_count, int device) {
  switch (tile) {
    case Fp8GemmTile::kN32: return sm90_fp8_grouped_gemm_n32_scratch_bytes(groups, sm_count, device);
    case Fp8GemmTile::kN64: return sm90_fp8_grouped_gemm_n64_scratch_bytes(groups, sm_count, device);
    default: return sm90_fp8_grouped_gemm_n128_scratch_bytes(groups, sm_count, device);
  }
}

// Both GEMMs' arguments of a two-GEMM pipeline (an MoE layer) in one launch; run each with args_ready = true.
inline cudaError_t sm90_fp8_grouped_gemm_args(Fp8GemmTile tile, const Fp8GroupedGemmProblem& p1, void* scratch1,
                                              size_t bytes1, const Fp8GroupedGemmProblem* p2, void* scratch2,
                                              size_t bytes2, int sm_count, int device, cudaStream_t stream) {
  switch (tile) {
    case Fp8GemmTile::kN32:
      return sm90_fp8_grouped_gemm_n32_args(p1, scratch1, bytes1, p2, scratch2, bytes2, sm_count, device, stream);
    case Fp8GemmTile::kN64:
      return sm90_fp8_grouped_gemm_n64_args(p1, scratch1, bytes1, p2, scratch2, bytes2, sm_count, device, stream);
    default:
      return sm90_fp8_grouped_gemm_n128_args(p1, scratch1, bytes1, p2, scratch2, bytes2, sm_count, device, stream);
  }
}

inline cudaError_t sm90_fp8_grouped_gemm(Fp8GemmTile tile, const Fp8GroupedGemmProblem& p, void* scratch,
                                         size_t scratch_bytes, int sm_count, int device, cudaStream_t stream,
                                         bool args_ready = false) {
  switch (tile) {
    case Fp8GemmTile::kN32:
      return sm90_fp8_grouped_gemm_n32(p, scratch, scratch_bytes, sm_count, device, stream, args_ready);
    case Fp8GemmTile::kN64:
      return sm90_fp8_grouped_gemm_n64(p, scratch, scratch_bytes, sm_count, device, stream, args_ready);
    default:
      return sm90_fp8_grouped_gemm_n128(p, scratch, scratch_bytes, sm_count, device, stream, args_ready);
  }
}

// NOTE: weights dominate the bytes, so the token tile only needs to cover a typical group's rows
// once (each extra token tile re-reads its weight tile, from L2 when CTAs run side by side), while
// narrower tiles waste fewer wgmma columns on small groups (~16 rows per expert at batch 1). A dense
// problem (rows shared by all groups) prefers 64-wide tiles up to 256 rows: with 128 they would leave
// half the SMs idle at batch 1 (e.g. q_proj: 32 weight tiles x 2 token tiles).
inline Fp8GemmTile choose_fp8_gemm_tile(int64_t rows, int groups, bool rows_shared_by_groups) {
  if (rows_shared_by_groups) {
    if (rows <= 32) return Fp8GemmTile::kN32;
    return rows <= 256 ? Fp8GemmTile::kN64 : Fp8GemmTile::kN128;
  }
  const int64_t per_group = rows / (groups > 0 ? groups : 1);
  if (per_group <= 24) return Fp8GemmTile::kN32;
  return per_group <= 96 ? Fp8GemmTile::kN64 : Fp8GemmTile::kN128;
}

}  // namespace dgemma::kernels
