// CUTLASS instantiation of the MoE experts' contiguous FP8 GEMM (see sm90_moe_grouped_gemm.cuh for the contract).
// Included only by the per-tile .cu files.
//
// CUTLASS's cooperative sm90 kernel (producer warp: TMA loads into a multi-stage shared-memory ring; two consumer
// warpgroups: wgmma over halves of the 128 weight rows; TMA-store epilogue) with two changes made through its
// extension points, not by editing it:
//   * the problem is batched over experts, L = experts: A (weights) has the expert stride n_out*k, while the token
//     rows B and the output D have a static zero stride in L (one descriptor each; every expert addresses the
//     same row-sorted tensors, CuTe leaves a static stride-0 mode out of the TMA descriptor);
//   * ContiguousScheduler hands out only (weight tile, token tile) pairs of the tokens in use, with L = the token
//     tile's expert read from the plan's tile_expert table: each token tile is computed against its own expert's
//     weights only. It is persistent (grid = SMs) and walks the weight tiles of one token tile on neighbouring
//     CTAs, which then share that token tile in L2.
// Epilogue (visitor tree): D = w_scale[e, m] * (row_scale[n] * acc), fp32, one rounding to bf16.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "kernels/pdl.cuh"
#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/sm90_moe_grouped_gemm.cuh"

namespace dgemma::kernels::sm90_moe {

struct ContiguousSchedulerTag {};

using PersistentSm90 = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90;

struct ContiguousSchedulerArguments : PersistentSm90::Arguments {
  const int32_t* tile_expert = nullptr;
  const int32_t* num_tiles = nullptr;
};

struct ContiguousSchedulerParams : PersistentSm90::Params {
  const int32_t* tile_expert = nullptr;
  const int32_t* num_tiles = nullptr;
  int32_t tiles_m = 1;
  int32_t tiles_n = 0;  // token tiles of the buffers (rows_cap / TileN): num_tiles never exceeds it
};

// Work tiles (weight tile m, token tile n, expert tile_expert[n]) for n < *num_tiles, in the order
// idx = n * tiles_m + m, strided over the persistent grid.
// NOTE: the table and count come from the plan, two kernels earlier; under programmatic dependent launch
// (kernels/pdl.cuh) a CTA may start before they are written, so initial_work_tile_info waits (pdl_wait) before the
// first read: keep that wait.
class ContiguousScheduler : public PersistentSm90 {
  using Base = PersistentSm90;
  using BaseArguments = PersistentSm90::Arguments;
  using BaseParams = PersistentSm90::Params;

 public:
  using WorkTileInfo = Base::WorkTileInfo;
  using Arguments = ContiguousSchedulerArguments;
  using Params = ContiguousSchedulerParams;

  // The base scheduler's parameters for one batch (the token tiles), plus the plan's table.
  template <class ProblemShapeMNKL, class TileShape, class ClusterShape>
  static Params to_underlying_arguments(ProblemShapeMNKL problem_shape_mnkl, TileShape tile_shape,
                                        ClusterShape cluster_shape, cutlass::KernelHardwareInfo const& hw_info,
                                        Arguments const& args, void* workspace = nullptr,
                                        const uint32_t epilogue_subtile = 1,
                                        uint32_t ktile_start_alignment_count = 1u) {
    const auto one_batch = cute::make_shape(cute::get<0>(problem_shape_mnkl), cute::get<1>(problem_shape_mnkl),
                                            cute::get<2>(problem_shape_mnkl), 1);
    Params p;
    const BaseArguments& base_args = args;
    static_cast<BaseParams&>(p) = Base::to_underlying_arguments(one_batch, tile_shape, cluster_shape, hw_info,
                                                                base_args, workspace, epilogue_subtile,
                                                                ktile_start_alignment_count);
    p.tile_expert = args.tile_expert;
    p.num_tiles = args.num_tiles;
    const int m = static_cast<int>(cute::get<0>(problem_shape_mnkl));
    p.tiles_m = (m + static_cast<int>(cute::size<0>(tile_shape)) - 1) / static_cast<int>(cute::size<0>(tile_shape));
    p.tiles_n = static_cast<int>(cute::get<1>(problem_shape_mnkl)) / static_cast<int>(cute::size<1>(tile_shape));
    return p;
  }

  template <class ProblemShape, class BlockShape, class ClusterShape>
  static dim3 get_grid_shape(Params const& params, ProblemShape problem_shape, BlockShape cta_shape,
                             ClusterShape cluster_shape, cutlass::KernelHardwareInfo hw_info,
                             Arguments arguments = Arguments{}, bool truncate_by_problem_size = true) {
    const auto one_batch = cute::make_shape(cute::get<0>(problem_shape), cute::get<1>(problem_shape),
                                            cute::get<2>(problem_shape), 1);
    const BaseArguments& base_args = arguments;
    const BaseParams& base_params = params;
    return Base::get_grid_shape(base_params, one_batch, cta_shape, cluster_shape, hw_info, base_args,
                                truncate_by_problem_size);
  }

  CUTLASS_HOST_DEVICE ContiguousScheduler() {}

  CUTLASS_DEVICE explicit ContiguousScheduler(Params const& params)
      : Base(params),
        tile_expert_(params.tile_expert),
        num_tiles_(params.num_tiles),
        tiles_m_(params.tiles_m),
        tiles_n_(params.tiles_n) {
#if defined(__CUDA_ARCH__)
    linear_idx_ = uint64_t(blockIdx.x) + uint64_t(blockIdx.y) * uint64_t(gridDim.x);
    grid_size_ = uint64_t(gridDim.x) * uint64_t(gridDim.y) * uint64_t(gridDim.z);
#endif
  }

  CUTLASS_DEVICE WorkTileInfo work_at(uint64_t idx) const {
    const uint64_t n = idx / static_cast<uint64_t>(tiles_m_);
    // Never past the token tiles the buffers hold, whatever the table says (a wrong plan must not read past them).
    if (n >= static_cast<uint64_t>(min(*num_tiles_, tiles_n_))) return WorkTileInfo::invalid_work_tile();
    return {static_cast<int32_t>(idx - n * static_cast<uint64_t>(tiles_m_)), static_cast<int32_t>(n), tile_expert_[n],
            true};
  }

  template <class ClusterShape>
  CUTLASS_DEVICE WorkTileInfo initial_work_tile_info(ClusterShape) {
    // The tables come from the plan: under programmatic dependent launch (pdl.cuh) this CTA may start before the
    // kernels before it have finished, and CUTLASS's kernel asks for its first tile before its own wait.
    pdl_wait();
    return work_at(linear_idx_);
  }

  CUTLASS_DEVICE WorkTileInfo get_current_work() const { return work_at(linear_idx_); }

  CUTLASS_DEVICE void advance_to_next_work(uint32_t advance_count = 1) {
    linear_idx_ += grid_size_ * uint64_t(advance_count);
  }

  CUTLASS_DEVICE bool is_last_tile(WorkTileInfo&, uint32_t advance_count = 1) const {
    return !work_at(linear_idx_ + grid_size_ * uint64_t(advance_count)).is_valid();
  }

  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo) {
    advance_to_next_work();
    return cute::make_tuple(get_current_work(), true);
  }

  template <class TileSchedulerPipeline, class TileSchedulerPipelineState>
  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo work_tile_info, TileSchedulerPipeline&,
                                      TileSchedulerPipelineState) {
    return fetch_next_work(work_tile_info);
  }

 private:
  const int32_t* tile_expert_ = nullptr;
  const int32_t* num_tiles_ = nullptr;
  int32_t tiles_m_ = 1;
  int32_t tiles_n_ = 0;
  uint64_t linear_idx_ = 0;
  uint64_t grid_size_ = 1;
};

}  // namespace dgemma::kernels::sm90_moe

namespace cutlass::gemm::kernel::detail {

template <class ArchTag, class TileShape, class ClusterShape, uint32_t SchedulerPipelineStageCount>
struct TileSchedulerSelector<dgemma::kernels::sm90_moe::ContiguousSchedulerTag, ArchTag, TileShape, ClusterShape,
                             SchedulerPipelineStageCount> {
  using Scheduler = dgemma::kernels::sm90_moe::ContiguousScheduler;
};

}  // namespace cutlass::gemm::kernel::detail

namespace dgemma::kernels::sm90_moe {

using cute::_0;
using cute::_1;
using cute::Stride;

// Batched over experts (L): weights (n_out, k, expert); tokens (rows, k, expert) and output (n_out, rows, expert)
// with a static zero expert stride (the same rows for every expert); per-row scales likewise.
template <int TileN>
struct MoeGemm : ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, _0>, Stride<_1, int64_t, _0>,
                               Stride<_0, _1, _0>, ContiguousSchedulerTag> {
  using Base = ScaledFp8Gemm<TileN, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, _0>, Stride<_1, int64_t, _0>,
                             Stride<_0, _1, _0>, ContiguousSchedulerTag>;

  static typename Base::Gemm::Arguments arguments(const MoeGemmProblem& p, int sm_count, int device) {
    auto args = Base::arguments(cutlass::gemm::GemmUniversalMode::kBatched, p.n_out, p.rows_cap, p.k, p.experts, p.w,
                                static_cast<int64_t>(p.n_out) * p.k, p.w_scale, p.x, p.row_scale, p.out, p.ldo,
                                sm_count, device);
    args.scheduler.tile_expert = p.tile_expert;
    args.scheduler.num_tiles = p.num_tiles;
    return args;
  }
};

template <int TileN>
size_t workspace_bytes(const MoeGemmProblem& p, int sm_count, int device) {
  using G = MoeGemm<TileN>;
  return G::Gemm::get_workspace_size(G::arguments(p, sm_count, device));
}

template <int TileN>
cudaError_t run(const MoeGemmProblem& p, void* workspace, size_t bytes, int sm_count, int device,
                cudaStream_t stream) {
  using G = MoeGemm<TileN>;
  if (p.rows_cap == 0 || p.experts == 0) return cudaSuccess;
  if (p.rows_cap % TileN != 0 || p.tile_expert == nullptr || p.num_tiles == nullptr ||
      !fp8_gemm_operands_fit(p.w, p.x, p.out, p.n_out, p.ldo))
    return cudaErrorInvalidValue;
  return run_cutlass<G>(G::arguments(p, sm_count, device), workspace, bytes, device, stream);
}

}  // namespace dgemma::kernels::sm90_moe
