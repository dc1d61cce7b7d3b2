// CUTLASS instantiation of the sm90 FP8 scaled dense GEMM (see sm90_fp8_scaled_gemm.cuh for the contract).
// Included only by the per-tile .cu files: each CUTLASS kernel is costly to compile.
//
// A persistent, warp-specialised TMA + wgmma kernel (CUTLASS's cooperative sm90 schedule: a producer warp
// loading weight and token tiles through TMA into a multi-stage shared-memory ring, two consumer warpgroups
// splitting the 128 weight rows of a tile). Operands are swapped as in the grouped GEMM: the weights are A
// (M = n_out, K-major), the tokens B (N = rows, K-major), so a 32- or 64-token tile fits small batches; the
// column-major D of leading dimension ldo is the row-major [rows, ldo] output.
//
// Epilogue (an epilogue visitor tree): D = w_scale[m] * (x_scale[n] * acc), in fp32, rounded once to bf16 and
// stored through TMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/cutlass_launch.cuh"
#include "kernels/sm90_fp8_scaled_gemm.cuh"

namespace dgemma::kernels {

namespace sm90_fp8_scaled {

using namespace cute;

using ElementW = cutlass::float_e4m3_t;
using ElementX = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using LayoutW = cutlass::layout::RowMajor;     // [n_out, k]: K contiguous
using LayoutX = cutlass::layout::ColumnMajor;  // [k, rows] column-major = [rows, k] row-major
using LayoutD = cutlass::layout::ColumnMajor;  // [n_out, rows] column-major = [rows, ldo] row-major
constexpr int kAlignFp8 = 16;
constexpr int kAlignD = 8;

template <int TileN>
struct ScaledGemm {
  using TileShape = Shape<_128, Int<TileN>, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

  // w_scale: one value per weight row (CUTLASS M), broadcast along N; x_scale: one per token (N), along M.
  using WScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using XScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using MulX = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                                      cutlass::FloatRoundStyle::round_to_nearest>;
  using MulW = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementD, float,
                                                      cutlass::FloatRoundStyle::round_to_nearest>;
  using ScaledAcc = cutlass::epilogue::fusion::Sm90EVT<MulX, XScale, Acc>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<MulW, WScale, ScaledAcc>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementW, LayoutW, kAlignFp8, ElementX, LayoutX,
      kAlignFp8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideW = typename Kernel::StrideA;
  using StrideX = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;

  static typename Gemm::Arguments arguments(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
    const int k = p.k;
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = cute::make_shape(p.n_out, p.rows, k, 1);
    // K-major operands: only the row stride is dynamic (the K stride is 1; one batch, so its stride is unused).
    StrideW sw{};
    cute::get<0>(sw) = k;
    StrideX sx{};
    cute::get<0>(sx) = k;
    StrideD sd{};
    cute::get<1>(sd) = p.ldo;  // column-major D: the token (column) stride is ldo
    args.mainloop = {reinterpret_cast<const ElementW*>(p.w), sw, reinterpret_cast<const ElementX*>(p.x), sx};
    // Arguments of the tree, children first: {w_scale, {x_scale, acc, x multiply}, w multiply}.
    args.epilogue.thread = {{p.w_scale}, {{p.x_scale}, {}, {}}, {}};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = sd;
    args.epilogue.ptr_D = reinterpret_cast<ElementD*>(p.out);
    args.epilogue.dD = sd;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    // Consecutive tiles walk the token dimension first: CTAs running side by side share a weight tile.
    args.scheduler.raster_order = Kernel::TileScheduler::RasterOrderOptions::AlongN;
    return args;
  }
};

template <int TileN>
size_t workspace_bytes(const Fp8ScaledGemmProblem& p, int sm_count, int device) {
  using G = ScaledGemm<TileN>;
  return G::Gemm::get_workspace_size(G::arguments(p, sm_count, device));
}

template <int TileN>
cudaError_t run(const Fp8ScaledGemmProblem& p, void* workspace, size_t bytes, int sm_count, int device,
                cudaStream_t stream) {
  using G = ScaledGemm<TileN>;
  if (p.rows == 0) return cudaSuccess;
  return run_cutlass<G>(G::arguments(p, sm_count, device), workspace, bytes, device, stream);
}

}  // namespace sm90_fp8_scaled
}  // namespace dgemma::kernels
