// The CUTLASS FP8 GEMM with the scales in its epilogue that the dense linears (sm90_fp8_scaled_gemm_impl.cuh) and
// the MoE experts (sm90_moe_grouped_gemm_impl.cuh) instantiate, and its launch.
//
// A persistent, warp-specialised TMA + wgmma kernel (CUTLASS's cooperative sm90 schedule: a producer warp loading
// weight and token tiles through TMA into a multi-stage shared-memory ring, two consumer warpgroups splitting the
// 128 weight rows of a tile). Operands are swapped: the weights are A (M = output channels, K-major), the tokens B
// (N = rows, K-major), so 32- or 64-token tiles fit small batches; a column-major D of leading dimension ldo is the
// row-major [rows, ldo] output. Epilogue (an epilogue visitor tree): D = w_scale[l, m] * (row_scale[n] * acc), in
// fp32, rounded once to bf16 and stored through TMA.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/pdl.cuh"

namespace dgemma::kernels {

// StrideW / StrideX / StrideD: (M, K, L), (N, K, L), (M, N, L) of the weights, tokens and output; RowScaleStride:
// the per-token scale's (M, N, L) stride; the per-channel weight scale has one row of M values per batch L.
// ClusterM x ClusterN: a thread-block cluster of that many weight x token tiles; each weight tile is multicast by TMA
// to the ClusterN CTAs that multiply it and each token tile to the ClusterM CTAs (read once from L2 per cluster
// rather than once per CTA). Every tile's arithmetic is the same: only where its operands come from changes.
// MainloopSchedule: FP8FastAccum (the default) lets the tensor cores accumulate a whole K loop, which is exact enough
// for the K of a linear layer (a few thousand); KernelTmaWarpSpecializedCooperative adds each 128-deep K tile's
// products to fp32 accumulators in registers (CUTLASS's promotion), for reductions as long as a vocabulary.
// ElementX: the tokens' FP8 format, e4m3 (the weights are e4m3); e5m2 for operands that need its range (the vocabulary
// head's probabilities).
template <int TileN, class StrideW_, class StrideX_, class StrideD_, class RowScaleStride, class SchedulerTag,
          int ClusterM = 1, int ClusterN = 1,
          class MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
          class ElementX_ = cutlass::float_e4m3_t>
struct ScaledFp8Gemm {
  using StrideW = StrideW_;
  using StrideX = StrideX_;
  using StrideD = StrideD_;
  using ElementW = cutlass::float_e4m3_t;
  using ElementX = ElementX_;
  using ElementD = cutlass::bfloat16_t;
  static constexpr int kAlignFp8 = 16;
  static constexpr int kAlignD = 8;
  using TileShape = cute::Shape<cute::_128, cute::Int<TileN>, cute::_128>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using KernelSchedule = MainloopSchedule;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

  using WScaleStride = cute::Stride<cute::_1, cute::_0, int64_t>;
  using WScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, WScaleStride>;
  using RowScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, RowScaleStride>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using MulRow = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                                        cutlass::FloatRoundStyle::round_to_nearest>;
  using MulW = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementD, float,
                                                      cutlass::FloatRoundStyle::round_to_nearest>;
  using Fusion =
      cutlass::epilogue::fusion::Sm90EVT<MulW, WScale, cutlass::epilogue::fusion::Sm90EVT<MulRow, RowScale, Acc>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, StrideD, kAlignD, ElementD, StrideD,
      kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementW, StrideW, kAlignFp8, ElementX, StrideX,
      kAlignFp8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, SchedulerTag>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Arguments of everything but the scheduler: weights [L][M][K] (batch stride w_batch, 0 for one batch), tokens
  // [N][K], output rows ldo apart, w_scale [L][M], row_scale [N].
  static typename Gemm::Arguments arguments(cutlass::gemm::GemmUniversalMode mode, int m, int n, int k, int l,
                                            const uint8_t* w, int64_t w_batch, const float* w_scale,
                                            const uint8_t* x, const float* row_scale, void* out, int64_t ldo,
                                            int sm_count, int device) {
    typename Gemm::Arguments args;
    args.mode = mode;
    args.problem_shape = cute::make_shape(m, n, k, l);
    // K-major operands: the row stride is dynamic, the K stride 1; a static zero batch stride stays zero.
    StrideW sw{};
    cute::get<0>(sw) = k;
    if constexpr (!cute::is_static_v<decltype(cute::get<2>(sw))>) cute::get<2>(sw) = w_batch;
    StrideX sx{};
    cute::get<0>(sx) = k;
    StrideD sd{};
    cute::get<1>(sd) = ldo;  // column-major D: the token (column) stride is ldo
    args.mainloop = {reinterpret_cast<const ElementW*>(w), sw, reinterpret_cast<const ElementX*>(x), sx};
    WScaleStride w_scale_stride{};
    cute::get<2>(w_scale_stride) = m;
    // Children first: {w_scale, {row_scale, acc, row multiply}, w multiply}.
    args.epilogue.thread = {{w_scale, 0.f, w_scale_stride}, {{row_scale}, {}, {}}, {}};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = sd;
    args.epilogue.ptr_D = reinterpret_cast<ElementD*>(out);
    args.epilogue.dD = sd;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

// What CUTLASS's can_implement does not check and its TMA descriptors need (with NDEBUG a bad stride only prints):
// 16-byte aligned operands and output, an output row stride (ldo, in bf16 elements) of at least n_out and a multiple
// of 8 (16 bytes).
inline bool fp8_gemm_operands_fit(const void* w, const void* x, const void* out, int64_t n_out, int64_t ldo) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned(w) && aligned(x) && aligned(out) && ldo >= n_out && ldo % 8 == 0;
}


// One launch of a CUTLASS 3 GEMM (G::Gemm, a GemmUniversalAdapter of G::Kernel) for `args`: the host work is the
// kernel parameters (its TMA descriptors) and the launch; nothing is synchronised. With DGEMMA_PDL=1 the launch is
// programmatic (pdl.cuh): the kernel's producer and epilogue warps wait for the kernels before it (CUTLASS's grid
// dependency control, compiled in with CUTLASS_ENABLE_GDC_FOR_SM90) and it lets the next kernel launch early. A kernel
// compiled without that control passes programmatic = false: it is launched plainly (after the kernel before it
// completes), and the kernel after it starts when it exits.
template <class G>
cudaError_t run_cutlass(const typename G::Gemm::Arguments& args, void* workspace, size_t workspace_bytes, int device,
                        cudaStream_t stream, bool programmatic = true) {
  if (workspace_bytes < G::Gemm::get_workspace_size(args)) return cudaErrorInvalidValue;
  if (G::Gemm::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  const cudaError_t err =
      allow_dynamic_smem<cutlass::device_kernel<typename G::Kernel>>(G::Kernel::SharedStorageSize, device);
  if (err != cudaSuccess) return err;
  if (G::Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess)
    return cudaErrorInvalidConfiguration;
  typename G::Kernel::Params params = G::Kernel::to_underlying_arguments(args, workspace);
  return launch_with_pdl_fallback([&](bool pdl) {
    if (G::Gemm::run(params, stream, nullptr, pdl && programmatic) == cutlass::Status::kSuccess)
      return cudaGetLastError();
    // The runtime's own error where it has one (a failed launch), not the sticky "launch failure" code.
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  });
}

}  // namespace dgemma::kernels
