// CUTLASS instantiation of the sm90 FP8 grouped GEMM (see sm90_fp8_grouped_gemm.cuh for the contract).
// Included only by the per-tile .cu files: each CUTLASS kernel is costly to compile.
//
// FP8 (E4M3) grouped GEMM on Hopper with CUTLASS's sm90 pointer-array kernels.
//
// Group g computes  D_g[rows_g, n_out] = X_g[rows_g, k] · W_g[n_out, k]^T  (fp32 accumulation, bf16 out)
// with every per-group size, pointer and stride built on the device, so the token counts per expert
// never travel to the host (no synchronisation, capturable in a CUDA graph).
//
// NOTE: operands are swapped relative to the usual "tokens are M" view: the weights are CUTLASS's A
// (M = n_out, row-major, K contiguous) and the tokens are B (N = rows_g, column-major, K contiguous).
// At batch 1 an expert sees ~16 rows, far below wgmma's 64-row M granularity, whereas the N side of a
// wgmma can be as narrow as 8; tiles are 128 (weights) x 32/64/128 (tokens). A column-major D of
// leading dimension ldd is exactly a row-major [rows, ldd] token-by-channel output.
//
// NOTE: the product is unscaled: the per-output-channel weight scale and the per-token activation scale
// are applied by the kernel that consumes D (fp8_epilogue.cuh, moe_dispatch.cuh), where they fuse with
// gelu·up, re-quantisation or the weighted un-permute. Rounding the unscaled fp32 sum to bf16 costs the
// same relative error as rounding the scaled one (bf16 has fp32's exponent range).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/pdl.cuh"
#include "kernels/sm90_fp8_grouped_gemm.cuh"

namespace dgemma::kernels {

namespace sm90_fp8 {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using ElementW = cutlass::float_e4m3_t;
using ElementX = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
using LayoutW = cutlass::layout::RowMajor;
using LayoutX = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::ColumnMajor;
constexpr int kAlignFp8 = 16;  // elements per 16-byte access
constexpr int kAlignD = 8;

// TileN: token tile width. Cooperative schedule: two consumer warpgroups split the 128 weight rows.
template <int TileN>
struct GroupedGemm {
  using TileShape = Shape<_128, Int<TileN>, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD, ElementD, LayoutD*,
      kAlignD, EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementW, LayoutW*, kAlignFp8, ElementX, LayoutX*,
      kAlignFp8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideW = typename Kernel::InternalStrideA;
  using StrideX = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // Per-group argument arrays, carved from the caller's scratch buffer.
  struct Arrays {
    Shape3* shapes;
    const ElementW** w;
    const ElementX** x;
    ElementD** d;
    StrideW* sw;
    StrideX* sx;
    StrideD* sd;
  };

  static size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

  static size_t arrays_bytes(int groups) {
    const size_t g = static_cast<size_t>(groups);
    return align_up(g * sizeof(Shape3)) + 3 * align_up(g * sizeof(void*)) + align_up(g * sizeof(StrideW)) +
           align_up(g * sizeof(StrideX)) + align_up(g * sizeof(StrideD));
  }

  static Arrays carve(void* scratch, int groups) {
    const size_t g = static_cast<size_t>(groups);
    char* p = static_cast<char*>(scratch);
    Arrays a;
    a.shapes = reinterpret_cast<Shape3*>(p);
    p += align_up(g * sizeof(Shape3));
    a.w = reinterpret_cast<const ElementW**>(p);
    p += align_up(g * sizeof(void*));
    a.x = reinterpret_cast<const ElementX**>(p);
    p += align_up(g * sizeof(void*));
    a.d = reinterpret_cast<ElementD**>(p);
    p += align_up(g * sizeof(void*));
    a.sw = reinterpret_cast<StrideW*>(p);
    p += align_up(g * sizeof(StrideW));
    a.sx = reinterpret_cast<StrideX*>(p);
    p += align_up(g * sizeof(StrideX));
    a.sd = reinterpret_cast<StrideD*>(p);
    return a;
  }

  static typename Gemm::Arguments arguments(const Arrays& a, int groups, int sm_count, int device) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    // No host copy of the shapes: they exist only on the device.
    args.problem_shape = {groups, a.shapes, nullptr};
    args.mainloop = {a.w, a.sw, a.x, a.sx};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = a.sd;
    args.epilogue.ptr_D = a.d;
    args.epilogue.dD = a.sd;
    args.hw_info = hw;
    // Consecutive tiles walk the token dimension first, so CTAs running side by side share a weight
    // tile (read from HBM once, then from L2) when an expert has more rows than one tile.
    args.scheduler.raster_order = Kernel::TileScheduler::RasterOrderOptions::AlongN;
    return args;
  }
};

// Group g's CUTLASS arguments.
template <class G>
__device__ __forceinline__ void write_group_args(const Fp8GroupedGemmProblem& p, const typename G::Arrays& a, int g) {
  const int row_begin = p.row_offsets ? p.row_offsets[g] : 0;
  const int rows = p.row_offsets ? p.row_offsets[g + 1] - row_begin : p.rows;
  a.shapes[g] = typename G::Shape3(p.n_out, rows, p.k);
  const uintptr_t w = reinterpret_cast<uintptr_t>(p.weights) + static_cast<uintptr_t>(g * p.weight_group_stride);
  a.w[g] = reinterpret_cast<const ElementW*>(w);
  a.x[g] = reinterpret_cast<const ElementX*>(p.activations + static_cast<int64_t>(row_begin) * p.k);
  a.d[g] = reinterpret_cast<ElementD*>(p.out + static_cast<int64_t>(row_begin) * p.ldo + g * p.out_group_stride);
  // K-major operands: only the row stride is dynamic (the K stride is 1, the batch stride unused).
  typename G::StrideW sw{};
  cute::get<0>(sw) = p.k;
  a.sw[g] = sw;
  typename G::StrideX sx{};
  cute::get<0>(sx) = p.k;
  a.sx[g] = sx;
  typename G::StrideD sd{};
  cute::get<1>(sd) = p.ldo;  // column-major D: the token (column) stride is ldo
  a.sd[g] = sd;
}

// One thread per group writes that group's arguments of one problem, or of two (p2.groups > 0: e.g. both GEMMs
// of an MoE layer, whose row offsets are final before the first runs; one launch instead of two).
template <class G>
__global__ void build_grouped_args_kernel(Fp8GroupedGemmProblem p1, typename G::Arrays a1, Fp8GroupedGemmProblem p2,
                                          typename G::Arrays a2) {
  pdl_begin();
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g < p1.groups) write_group_args<G>(p1, a1, g);
  if (g < p2.groups) write_group_args<G>(p2, a2, g);
}

// Scratch bytes a call needs: argument arrays, then CUTLASS's own workspace.
template <int TileN>
size_t grouped_gemm_scratch_bytes(int groups, int sm_count, int device) {
  using G = GroupedGemm<TileN>;
  typename G::Arrays a = G::carve(nullptr, groups);
  auto args = G::arguments(a, groups, sm_count, device);
  return G::arrays_bytes(groups) + G::align_up(G::Gemm::get_workspace_size(args));
}

template <int TileN>
cudaError_t build_grouped_args(const Fp8GroupedGemmProblem& p1, void* scratch1, size_t bytes1,
                               const Fp8GroupedGemmProblem* p2, void* scratch2, size_t bytes2, int sm_count, int device,
                               cudaStream_t stream) {
  using G = GroupedGemm<TileN>;
  Fp8GroupedGemmProblem second;  // groups == 0: nothing to write
  typename G::Arrays a2{};
  if (p2 != nullptr && p2->groups > 0) {
    if (bytes2 < grouped_gemm_scratch_bytes<TileN>(p2->groups, sm_count, device)) return cudaErrorInvalidValue;
    second = *p2;
    a2 = G::carve(scratch2, p2->groups);
  }
  if (p1.groups > 0 && bytes1 < grouped_gemm_scratch_bytes<TileN>(p1.groups, sm_count, device))
    return cudaErrorInvalidValue;
  const int groups = p1.groups > second.groups ? p1.groups : second.groups;
  if (groups == 0) return cudaSuccess;
  const typename G::Arrays a1 = p1.groups > 0 ? G::carve(scratch1, p1.groups) : typename G::Arrays{};
  build_grouped_args_kernel<G><<<(groups + 127) / 128, 128, 0, stream>>>(p1, a1, second, a2);
  return cudaGetLastError();
}

// args_ready: the arrays in `scratch` were written for `p` by build_grouped_args (on this stream, after the row
// offsets they read were final); otherwise they are written here first.
template <int TileN>
cudaError_t grouped_gemm(const Fp8GroupedGemmProblem& p, void* scratch, size_t scratch_bytes, int sm_count,
                         int device, cudaStream_t stream, bool args_ready) {
  using G = GroupedGemm<TileN>;
  if (p.groups == 0) return cudaSuccess;
  if (scratch_bytes < grouped_gemm_scratch_bytes<TileN>(p.groups, sm_count, device)) return cudaErrorInvalidValue;
  if (!args_ready) {
    const cudaError_t err =
        build_grouped_args<TileN>(p, scratch, scratch_bytes, nullptr, nullptr, 0, sm_count, device, stream);
    if (err != cudaSuccess) return err;
  }
  typename G::Arrays a = G::carve(scratch, p.groups);
  auto args = G::arguments(a, p.groups, sm_count, device);
  void* workspace = static_cast<char*>(scratch) + G::arrays_bytes(p.groups);
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidConfiguration;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace sm90_fp8
}  // namespace dgemma::kernels
