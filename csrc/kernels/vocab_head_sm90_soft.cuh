// The self-conditioning pass of the vocabulary head on Hopper: soft = bf16(scale·(P·E)).
//
// 1. vocab_head_rescale_kernel turns the statistics pass's q = exp(z − chunk max) into the probabilities
//    p = bf16(q·exp(chunk max − lse)) in place: exactly the bf16 values the mma.sync pass forms in registers
//    (scale_bf16x2), so both passes multiply the same P with E.
// 2. A CUTLASS sm90 GEMM, M = rows, N = hidden, K = vocab: A = P [rows, vocab_pad] K-major, B = E [vocab, hidden]
//    read N-major (wgmma takes transposed 16-bit tiles from shared memory) and multicast to a cluster of two row
//    tiles, cooperative warp-specialised mainloop, split-K over the vocabulary with CUTLASS's stream-K scheduler (deterministic, ordered reduction of
//    the splits), epilogue D = bf16(scale·acc) through TMA. K = vocab: the TMA box past the last embedding row
//    reads zeros, so no padding of E is needed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/pdl.cuh"
#include "kernels/vocab_head_mma.cuh"
#include "kernels/vocab_head_params.cuh"

namespace dgemma::kernels::vocab_head {

// The stored probabilities a thread of the rescale kernels owns: 8 consecutive ones (16 bytes, inside one 64-column
// chunk) of one row, and their chunk's maximum. False past the last row.
struct ProbsSlot {
  int64_t row, col;
  float chunk_max;
};

__device__ __forceinline__ bool probs_slot(const VocabHeadParams& p, const VocabHeadLayout& l, ProbsSlot& s) {
  const int64_t per_row = l.vocab_pad / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= l.rows * per_row) return false;
  s.row = i / per_row;
  s.col = (i % per_row) * 8;
  const unsigned char* ws = static_cast<const unsigned char*>(p.workspace);
  s.chunk_max = reinterpret_cast<const float*>(ws + l.chunk_max)[(s.col / kChunk) * l.rows_pad + s.row];
  return true;
}

// One thread per ProbsSlot.
__global__ void __launch_bounds__(256) vocab_head_rescale_kernel(const VocabHeadParams p, const VocabHeadLayout l) {
  pdl_begin();
  ProbsSlot s;
  if (!probs_slot(p, l, s)) return;
  const float scale = __expf(s.chunk_max - p.lse[s.row]);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  uint4* q = reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(ws + l.probs) + s.row * l.vocab_pad + s.col);
  uint4 v = *q;
  v.x = scale_bf16x2(v.x, scale);
  v.y = scale_bf16x2(v.y, scale);
  v.z = scale_bf16x2(v.z, scale);
  v.w = scale_bf16x2(v.w, scale);
  *q = v;
}

// The largest e5m2 value: the FP8 probabilities' top (python/dgemma/vocab_head.py P_FP8_MAX).
constexpr float kProbsFp8Max = 57344.f;

// The FP8 variant of step 1 (p.embed_fp8 set): the e5m2 operand P8 = e5m2(57344 · q · exp(chunk max − row max)) (the
// probabilities relative to the row's most likely token, so the largest is e5m2's largest; e5m2, not e4m3, for its
// range: a long tail of tokens 12-22 nats below the top keeps its mass, which e4m3 would flush to zero) into
// l.probs_fp8, and each row's dequantisation scale soft_scale · exp(row max − lse) / 57344 into l.soft_row_scale:
// then P8[r, v] · scale[r] = soft_scale · p[r, v] up to e5m2 rounding. One thread per ProbsSlot.
__global__ void __launch_bounds__(256) vocab_head_rescale_fp8_kernel(const VocabHeadParams p,
                                                                     const VocabHeadLayout l) {
  pdl_begin();
  ProbsSlot s;
  if (!probs_slot(p, l, s)) return;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const float row_max = p.max_logit[s.row];
  if (s.col == 0)
    reinterpret_cast<float*>(ws + l.soft_row_scale)[s.row] =
        p.soft_scale * (__expf(row_max - p.lse[s.row]) / kProbsFp8Max);
  const float scale = kProbsFp8Max * __expf(s.chunk_max - row_max);
  const uint4 q = *reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(ws + l.probs) +
                                                  s.row * l.vocab_pad + s.col);
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  uint32_t out[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[j]));
    const __nv_fp8x2_storage_t pair =
        __nv_cvt_float2_to_fp8x2(make_float2(f.x * scale, f.y * scale), __NV_SATFINITE, __NV_E5M2);
    out[j / 2] |= static_cast<uint32_t>(pair) << (16 * (j % 2));
  }
  *reinterpret_cast<uint2*>(ws + l.probs_fp8 + s.row * l.vocab_pad + s.col) = make_uint2(out[0], out[1]);
}

struct VocabSoftGemm {
  using Element = cutlass::bfloat16_t;
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;  // P [rows][vocab_pad]
  using StrideB = cute::Stride<cute::_1, int64_t, int64_t>;  // E [vocab][hidden] as (N = hidden, K = vocab)
  using StrideD = cute::Stride<int64_t, cute::_1, int64_t>;  // soft [rows][hidden]
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  // Two row tiles per cluster: each embedding tile (the B operand) is multicast to both, read once from L2.
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Fusion = cutlass::epilogue::fusion::ScaledAcc<cutlass::bfloat16_t, float, float>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, StrideD, 8, cutlass::bfloat16_t, StrideD,
      8, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, StrideA, 8, Element, StrideB, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static constexpr int kTileM = 128, kTileN = 128;

  // The split count: the smallest whose waves over `sms` CTAs are at least 90% full (at most 16).
  static int splits(int64_t rows, int dim, int vocab, int sms) {
    const int64_t tiles = ceil_div(rows, kTileM) * ceil_div(dim, kTileN);
    const int64_t k_tiles = ceil_div(vocab, 64);
    int split = 1;
    for (; split < 16 && split < k_tiles; ++split) {
      const int64_t units = tiles * split;
      if (units * 10 >= ceil_div(units, sms) * sms * 9) break;
    }
    return split;
  }

  static typename Gemm::Arguments arguments(const VocabHeadParams& p, const VocabHeadLayout& l, int splits, int sms,
                                            int device) {
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = cute::make_shape(static_cast<int>(l.rows), p.dim, p.vocab, 1);
    const StrideA sa{l.vocab_pad, {}, l.rows * l.vocab_pad};            // probability rows vocab_pad apart
    const StrideB sb{{}, p.dim, static_cast<int64_t>(p.vocab) * p.dim};  // N (hidden) contiguous, K rows dim apart
    const StrideD sd{p.dim, {}, l.rows * p.dim};
    const unsigned char* ws = static_cast<const unsigned char*>(p.workspace);
    args.mainloop = {reinterpret_cast<const Element*>(ws + l.probs), sa, reinterpret_cast<const Element*>(p.embed),
                     sb};
    args.epilogue.thread.alpha = p.soft_scale;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = sd;
    args.epilogue.ptr_D = reinterpret_cast<cutlass::bfloat16_t*>(p.soft);
    args.epilogue.dD = sd;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sms;
    using Scheduler = typename Kernel::TileScheduler;
    args.scheduler.splits = splits;
    args.scheduler.decomposition_mode = Scheduler::DecompositionMode::SplitK;
    args.scheduler.reduction_mode = Scheduler::ReductionMode::Deterministic;
    return args;
  }
};

}  // namespace dgemma::kernels::vocab_head
