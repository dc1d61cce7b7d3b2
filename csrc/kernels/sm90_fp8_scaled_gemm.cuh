// FP8 (E4M3) dense GEMM on Hopper with the scales in the epilogue: the torch-free, CUTLASS-free contract.
//
//   out[r, c] = bf16( (sum_k x[r, k] * w[c, k]) * x_scale[r] * w_scale[c] )      (fp32 accumulation)
//
// One launch per call: no argument-building kernel (the problem is dense; TMA descriptors are built on the host
// from the pointers) and no separate scaling kernel (the per-token x scale and the per-channel w scale are
// applied to the fp32 accumulators before the single rounding to bf16). The attention projections (q/k/v as one
// weight, o_proj), the dense MLP's fused gate/up and its down projection run through it.
// The CUTLASS kernels live in sm90_fp8_scaled_gemm_impl.cuh, one token-tile width per .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/sm90_fp8_grouped_gemm.cuh"

namespace dgemma::kernels {

// All pointers are device pointers.
struct Fp8ScaledGemmProblem {
  int rows = 0;   // tokens (CUTLASS N: operands are swapped as in sm90_fp8_grouped_gemm.cuh)
  int n_out = 0;  // output channels, weight rows (CUTLASS M); a multiple of 8
  int k = 0;      // reduction length; a multiple of 16 (16-byte TMA alignment of fp8 rows)
  const uint8_t* w = nullptr;     // [n_out, k] fp8, row-major, 16-byte aligned
  const float* w_scale = nullptr;  // [n_out]
  const uint8_t* x = nullptr;     // [rows, k] fp8, row-major (row stride k), 16-byte aligned
  const float* x_scale = nullptr;  // [rows]
  __nv_bfloat16* out = nullptr;   // [rows, n_out] bf16, row stride ldo (a multiple of 8), 16-byte aligned
  int64_t ldo = 0;
};

#define DGEMMA_DECLARE_FP8_SCALED_GEMM(N)                                                                     \
  size_t sm90_fp8_scaled_gemm_n##N##_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device); \
  cudaError_t sm90_fp8_scaled_gemm_n##N(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes, \
                                        int sm_count, int device, cudaStream_t stream);
DGEMMA_DECLARE_FP8_SCALED_GEMM(32)
DGEMMA_DECLARE_FP8_SCALED_GEMM(64)
DGEMMA_DECLARE_FP8_SCALED_GEMM(128)
// The 64- and 128-token tiles in clusters of 2 x 2 tiles (fp8_scaled_gemm_cluster.cu): each weight tile and each token
// tile read once from L2 per cluster and multicast by TMA to the two CTAs that use it. At a few hundred rows the
// unclustered kernel reads every weight tile once per token tile and every token tile once per weight tile, several
// times the bytes of the operands themselves (bench/results/moe.json: 0.2-0.5 of the HBM roofline).
DGEMMA_DECLARE_FP8_SCALED_GEMM(64_c2)
DGEMMA_DECLARE_FP8_SCALED_GEMM(128_c2)
// Every token tile on CUTLASS's stream-K scheduler (fp8_scaled_gemm_streamk.cu): a few hundred rows by a few thousand
// output channels make a partial wave of tiles (o_proj at 256 rows: 88 tiles of 128 x 64 on 132 SMs; k_proj: 32), each
// CTA walking a long K loop alone; stream-K shares the K loops of the last two waves out so every SM streams weights.
DGEMMA_DECLARE_FP8_SCALED_GEMM(32_sk)
DGEMMA_DECLARE_FP8_SCALED_GEMM(64_sk)
DGEMMA_DECLARE_FP8_SCALED_GEMM(128_sk)
#undef DGEMMA_DECLARE_FP8_SCALED_GEMM

// The token tile follows the dense rule of choose_fp8_gemm_tile (rows shared by every weight tile).
inline Fp8GemmTile choose_scaled_gemm_tile(int64_t rows) { return choose_fp8_gemm_tile(rows, 1, true); }

// DGEMMA_DENSE_CLUSTER, read once per process: unset, "" or "off" (the default until a GPU run has measured the
// clusters) -> 1; "2x2" -> 2. Anything else is refused by every call (ValueError naming it).
int dense_cluster_setting();

// DGEMMA_DENSE_SCHEDULE, read once per process: unset, "" or "persistent" (the default until a GPU run has measured
// stream-K) -> false; "streamk" -> true (every dense GEMM on the stream-K kernels; DGEMMA_DENSE_CLUSTER then does not
// apply). Anything else is refused by every call (ValueError naming it).
bool dense_streamk_setting();

// One compiled dense GEMM: its workspace query and its launch.
struct ScaledGemmKernel {
  size_t (*workspace_bytes)(const Fp8ScaledGemmProblem&, int sm_count, int device);
  cudaError_t (*run)(const Fp8ScaledGemmProblem&, void* workspace, size_t workspace_bytes, int sm_count, int device,
                     cudaStream_t stream);
};

// The kernel a problem runs on: the token tile by its rows, then the schedule and cluster settings (both read on every
// call, so an unknown one is refused whichever kernel would run). A cluster needs at least two tiles each way (a
// cluster of one token tile would leave half its CTAs without work).
inline ScaledGemmKernel choose_scaled_gemm_kernel(const Fp8ScaledGemmProblem& p) {
#define DGEMMA_SCALED_GEMM(N) ScaledGemmKernel{sm90_fp8_scaled_gemm_n##N##_workspace_bytes, sm90_fp8_scaled_gemm_n##N}
  const Fp8GemmTile tile = choose_scaled_gemm_tile(p.rows);
  const bool cluster = dense_cluster_setting() == 2 && p.n_out > 128;
  const bool streamk = dense_streamk_setting();
  switch (tile) {
    case Fp8GemmTile::kN32:
      return streamk ? DGEMMA_SCALED_GEMM(32_sk) : DGEMMA_SCALED_GEMM(32);
    case Fp8GemmTile::kN64:
      return streamk ? DGEMMA_SCALED_GEMM(64_sk) : cluster && p.rows > 64 ? DGEMMA_SCALED_GEMM(64_c2)
                                                                          : DGEMMA_SCALED_GEMM(64);
    default:
      return streamk ? DGEMMA_SCALED_GEMM(128_sk) : cluster && p.rows > 128 ? DGEMMA_SCALED_GEMM(128_c2)
                                                                            : DGEMMA_SCALED_GEMM(128);
  }
#undef DGEMMA_SCALED_GEMM
}

inline size_t sm90_fp8_scaled_gemm_workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  return choose_scaled_gemm_kernel(p).workspace_bytes(p, sm_count, device);
}

inline cudaError_t sm90_fp8_scaled_gemm(const Fp8ScaledGemmProblem& p, void* workspace, size_t workspace_bytes,
                                        int sm_count, int device, cudaStream_t stream) {
  return choose_scaled_gemm_kernel(p).run(p, workspace, workspace_bytes, sm_count, device, stream);
}

}  // namespace dgemma::kernels
