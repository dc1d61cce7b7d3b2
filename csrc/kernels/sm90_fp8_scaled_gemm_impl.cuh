// CUTLASS instantiation of the sm90 FP8 scaled dense GEMM (see sm90_fp8_scaled_gemm.cuh for the contract; the
// kernel is sm90_fp8_cutlass.cuh's). Included only by the per-tile .cu files: each CUTLASS kernel is costly to compile.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/sm90_fp8_scaled_gemm.cuh"

namespace dgemma::kernels {

namespace sm90_fp8_scaled {

using cute::_0;
using cute::_1;
using cute::Stride;

// One batch: weights [n_out, k], tokens [rows, k], output [rows, ldo]; a persistent scheduler over the tiles, in
// clusters of Cluster x Cluster tiles (1: none).
template <int TileN, int Cluster = 1>
struct ScaledGemm : ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, int64_t>,
                                  Stride<_1, int64_t, int64_t>, Stride<_0, _1, int64_t>,
                                  cutlass::gemm::PersistentScheduler, Cluster, Cluster> {
  using Base = ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, int64_t>,
                             Stride<_1, int64_t, int64_t>, Stride<_0, _1, int64_t>, cutlass::gemm::PersistentScheduler,
                             Cluster, Cluster>;

  static typename Base::Gemm::Arguments arguments(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
    auto args = Base::arguments(cutlass::gemm::GemmUniversalMode::kGemm, p.n_out, p.rows, p.k, 1, p.w, 0, p.w_scale,
                                p.x, p.x_scale, p.out, p.ldo, sm_count, device);
    // Consecutive tiles walk the token dimension first: CTAs running side by side share a weight tile.
    args.scheduler.raster_order = Base::Kernel::TileScheduler::RasterOrderOptions::AlongN;
    return args;
  }
};

template <int TileN, int Cluster = 1>
size_t workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  using G = ScaledGemm<TileN, Cluster>;
  return G::Gemm::get_workspace_size(G::arguments(p, sm_count, device));
}

template <int TileN, int Cluster = 1>
cudaError_t run(const Fp8ScaledGemmProblem& p, void* workspace, size_t bytes, int sm_count, int device,
                cudaStream_t stream) {
  using G = ScaledGemm<TileN, Cluster>;
  if (p.rows == 0) return cudaSuccess;
  if (!fp8_gemm_operands_fit(p.w, p.x, p.out, p.n_out, p.ldo)) return cudaErrorInvalidValue;
  return run_cutlass<G>(G::arguments(p, sm_count, device), workspace, bytes, device, stream);
}

}  // namespace sm90_fp8_scaled
}  // namespace dgemma::kernels
