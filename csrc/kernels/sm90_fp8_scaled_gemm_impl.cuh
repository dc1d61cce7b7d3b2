// CUTLASS instantiation of the sm90 FP8 scaled dense GEMM (see sm90_fp8_scaled_gemm.cuh for the contract; the
// kernel is sm90_fp8_cutlass.cuh's). Included only by the per-tile .cu files: each CUTLASS kernel is costly to compile.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/sm90_fp8_scaled_gemm.cuh"

namespace dgemma::kernels {

namespace sm90_fp8_scaled {

using cute::_0;
using cute::_1;
using cute::Stride;

// One batch: weights [n_out, k], tokens [rows, k], output [rows, ldo]; a persistent scheduler over the tiles, in
// clusters of Cluster x Cluster tiles (1: none), or (Scheduler = StreamKScheduler) CUTLASS's stream-K scheduler: where
// the tiles would leave SMs idle (a few hundred rows, a few thousand output channels) their K loops are shared out
// over the SMs and the partial sums reduced in a fixed order (deterministic), before the same epilogue.
// Mainloop: the accumulation of ScaledFp8Gemm (FP8FastAccum unless a reduction is too long for it); ElementX: the
// tokens' FP8 format (e4m3 unless they need e5m2's range).
template <int TileN, int Cluster = 1, class Scheduler = cutlass::gemm::PersistentScheduler,
          class Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
          class ElementX = cutlass::float_e4m3_t>
struct ScaledGemm : ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, int64_t>,
                                  Stride<_1, int64_t, int64_t>, Stride<_0, _1, int64_t>, Scheduler, Cluster, Cluster,
                                  Mainloop, ElementX> {
  using Base = ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, int64_t>,
                             Stride<_1, int64_t, int64_t>, Stride<_0, _1, int64_t>, Scheduler, Cluster, Cluster,
                             Mainloop, ElementX>;

  static typename Base::Gemm::Arguments arguments(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
    auto args = Base::arguments(cutlass::gemm::GemmUniversalMode::kGemm, p.n_out, p.rows, p.k, 1, p.w, 0, p.w_scale,
                                p.x, p.x_scale, p.out, p.ldo, sm_count, device);
    // Consecutive tiles walk the token dimension first: CTAs running side by side share a weight tile.
    args.scheduler.raster_order = Base::Kernel::TileScheduler::RasterOrderOptions::AlongN;
    if constexpr (std::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>) {
      using Params = typename Base::Kernel::TileScheduler::Params;
      // StreamK, not Heuristic: CUTLASS's heuristic keeps a single partial wave (o_proj at 256 rows: 88 tiles on 132
      // SMs) data-parallel, the case this kernel is for. Full waves stay data-parallel either way.
      args.scheduler.decomposition_mode = Params::DecompositionMode::StreamK;
      args.scheduler.reduction_mode = Params::ReductionMode::Deterministic;
    }
    return args;
  }
};

template <int TileN, int Cluster = 1, class Scheduler = cutlass::gemm::PersistentScheduler,
          class Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
          class ElementX = cutlass::float_e4m3_t>
size_t workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  using G = ScaledGemm<TileN, Cluster, Scheduler, Mainloop, ElementX>;
  return G::Gemm::get_workspace_size(G::arguments(p, sm_count, device));
}

template <int TileN, int Cluster = 1, class Scheduler = cutlass::gemm::PersistentScheduler,
          class Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
          class ElementX = cutlass::float_e4m3_t>
cudaError_t run(const Fp8ScaledGemmProblem& p, void* workspace, size_t bytes, int sm_count, int device,
                cudaStream_t stream) {
  using G = ScaledGemm<TileN, Cluster, Scheduler, Mainloop, ElementX>;
  if (p.rows == 0) return cudaSuccess;
  if (!fp8_gemm_operands_fit(p.w, p.x, p.out, p.n_out, p.ldo)) return cudaErrorInvalidValue;
  // Stream-K kernels are compiled without grid dependency control (fp8_scaled_gemm_streamk.cu): launched plainly.
  constexpr bool programmatic = !std::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>;
  return run_cutlass<G>(G::arguments(p, sm_count, device), workspace, bytes, device, stream, programmatic);
}

}  // namespace sm90_fp8_scaled
}  // namespace dgemma::kernels
