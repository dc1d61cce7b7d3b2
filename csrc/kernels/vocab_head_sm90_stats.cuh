// The statistics pass of the vocabulary head as a CUTLASS sm90 GEMM with the reduction in its epilogue.
//
// Mainloop: CUTLASS's persistent, warp-specialised kernel (a TMA producer warp feeding a multi-stage shared-memory
// ring, two consumer warpgroups of wgmma, ping-pong or cooperative: VocabStatsGemm), A = h [rows, hidden] and
// B = E [vocab, hidden], both K-major, fp32 accumulators. Tiles are rastered along M, so the row tiles that read
// one embedding tile run side by side and share it in L2.
//
// Epilogue (VocabStatsEpilogue, no shared memory, wrapped by CUTLASS's adapter for register epilogues): the
// accumulators of a TileM x TileN tile never leave registers. A wgmma accumulator fragment gives each thread two rows
// (r and r + 8 of its warp's 16) and, per 8-column block, two adjacent columns; the four lanes of a quad hold one
// row's columns. Each 64-column chunk of a row goes through fold_chunk (vocab_head_rows.cuh, the same per-logit
// math as the mma.sync pass): softcap and 1/t, chunk maximum, Σexp, Σexp·z, argmax, the Philox Gumbel-max sample
// and the bf16 q = exp(z − chunk max); the quad's states are merged and lane 0 writes the row's StatsPartial for
// this vocab tile. The merge kernel then reduces a row's partials in tile order.
//
// Two-pass variant (VocabStatsEpilogue<..., true>): the epilogue only stores the fp32 accumulators (logits
// [rows, vocab_pad] at the start of the call's CUTLASS workspace, vocab_head_logits) and vocab_head_stats_rows_kernel
// folds them afterwards, a warp per (8 rows, 128-column tile), each quad one row laid out as in the wgmma
// accumulator (lane q: columns 8j + 2q + {0, 1} of each 64-column chunk): the same fold_chunk calls in the same
// order on the same values, so the same partials. Why: in one pass the statistics of a tile (about 140 instructions
// per logit: softcap, exponentials, Philox, two logarithms) run in one warp per scheduler between the tile's MMAs, a
// long chain of dependent latencies; in the second pass many warps per scheduler hide them, for ~0.5 GB of fp32
// logits written and read per 256-row canvas.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/pdl.cuh"
#include "kernels/vocab_head_params.cuh"
#include "kernels/vocab_head_rows.cuh"

namespace dgemma::kernels::vocab_head {

// The fp32 logits of a two-pass call: the first rows · vocab_pad floats of its CUTLASS workspace (the GEMM's own
// workspace follows them).
__host__ __device__ inline size_t vocab_head_logits_bytes(const VocabHeadLayout& l) {
  return align_up(static_cast<size_t>(l.rows) * l.vocab_pad * sizeof(float), 256);
}

// kStoreLogits: the first pass of the two-pass variant (store the accumulators; see above).
template <int TileM, int TileN, bool kStoreLogits = false>
class VocabStatsEpilogue {
 public:
  static_assert(TileN % kChunk == 0, "a vocab tile holds whole 64-column chunks");
  // Unused by this epilogue (it writes no D tensor); named because the kernel's type plumbing asks for them.
  using ElementC = float;
  using ElementD = float;
  using StrideC = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    VocabHeadParams p;
    VocabHeadLayout l;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }

  CUTLASS_HOST_DEVICE explicit VocabStatsEpilogue(Params const& params, SharedStorage const& = SharedStorage())
      : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL, BlockShapeMNK, BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                 ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<BlockShapeMNK>::value && size<0>(BlockShapeMNK{}) == TileM &&
                      size<1>(BlockShapeMNK{}) == TileN,
                  "the epilogue is compiled for its kernel's tile");
    const VocabHeadParams& p = params_.p;
    const VocabHeadLayout& l = params_.l;
    const int64_t m_tile = static_cast<int64_t>(get<0>(blk_coord_mnkl));
    const int64_t n_tile = static_cast<int64_t>(get<1>(blk_coord_mnkl));

    // Each accumulator's (row, column) in the tile, from the MMA's own partitioning of an identity tensor.
    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor coords = thr_mma.partition_C(make_identity_tensor(make_shape(Int<TileM>{}, Int<TileN>{})));
    // The wgmma accumulator fragment: ((2 columns, 2 rows, TileN/8 column blocks), MMA_M, MMA_N) = ((2,2,N/8),1,1)
    // (a 64-row tile per warpgroup: TileM 128 with two cooperating warpgroups, or 64 ping-pong): value 4·j + 2·h + e
    // is row h (of the thread's two), column 8·j + 2·(lane % 4) + e.
    static_assert(size(FrgLayout{}) == TileN / 2 && size<1>(FrgLayout{}) == 1 && size<2>(FrgLayout{}) == 1,
                  "a 64 x TileN wgmma accumulator per warpgroup: two rows per thread");
    static_assert(is_same_v<decltype(shape<0>(FrgLayout{})), Shape<_2, _2, Int<TileN / 8>>>,
                  "accumulator values ordered (column pair, row half, column block)");
    const int q = (thread_idx & 31) & 3;
    unsigned char* ws = static_cast<unsigned char*>(p.workspace);

    if constexpr (kStoreLogits) {
      // Value 4·j + 2·h + e: row h of the thread's two, column 8·j + 2·(lane % 4) + e. Every column of the tile is
      // stored, those past the vocabulary too (the products with zero-filled embedding rows: 0, or NaN where h holds
      // an infinity), so the second pass folds exactly what the one-pass epilogue does; rows past the end are not.
      float* logits = reinterpret_cast<float*>(ws + l.cutlass);
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m_tile * TileM + get<0>(coords(2 * h));
        if (row >= l.rows || n_tile >= l.parts) continue;
        float* out = logits + row * l.vocab_pad + n_tile * TileN + 2 * q;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < TileN / 8; ++j)
          *reinterpret_cast<float2*>(out + 8 * j) =
              make_float2(accumulators(4 * j + 2 * h), accumulators(4 * j + 2 * h + 1));
      }
      return;
    }
    const LogitMath math = logit_math(p);
    const bool write_probs = p.soft != nullptr;
    StatsPartial* partials = reinterpret_cast<StatsPartial*>(ws + l.partials);

    CUTLASS_PRAGMA_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m_tile * TileM + get<0>(coords(2 * h));
      const bool row_ok = row < l.rows;
      // Rows past the end (TMA zero-filled) still take part in the quad's shuffles; they write nothing.
      const RowStream stream = row_stream(p, row);
      RowState st = empty_row_state();
      CUTLASS_PRAGMA_UNROLL
      for (int c = 0; c < TileN / kChunk; ++c) {
        float v[16];
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 8; ++j)
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < 2; ++e) v[2 * j + e] = accumulators(4 * (8 * c + j) + 2 * h + e);
        const int64_t col_base = n_tile * TileN + c * kChunk;
        const int64_t chunk = col_base / kChunk;
        const bool store = write_probs && row_ok && col_base < l.vocab_pad;
        float* chunk_max = store ? reinterpret_cast<float*>(ws + l.chunk_max) + chunk * l.rows_pad + row : nullptr;
        __nv_bfloat16* probs = store ? reinterpret_cast<__nv_bfloat16*>(ws + l.probs) + row * l.vocab_pad : nullptr;
        fold_chunk(v, col_base, q, math, stream, st, chunk_max, probs, l.vocab_pad);
      }
      st = quad_merged(st);
      // A cluster's grid is rounded up to whole clusters: a tile past the last vocab tile is computed (zero-filled
      // operands) but has no partial to write.
      if (q == 0 && row_ok && n_tile < l.parts) partials[row * l.parts + n_tile] = stats_partial(st);
    }
  }

 private:
  Params params_;
};

// The statistics GEMM: M = rows, N = vocab, K = hidden, one batch. Schedules: ping-pong (KernelTmaWarpSpecialized-
// Pingpong, TileM = 64: each consumer warpgroup owns whole tiles and the two alternate, so one's statistics epilogue
// runs while the other's MMAs do) or cooperative (TileM = 128: both warpgroups on one tile, the epilogue between
// tiles).
// ClusterM > 1: that many CTAs of consecutive row tiles form a cluster and the embedding tile is multicast to them
// (read once from L2 per cluster rather than once per row tile); ClusterN > 1 likewise multicasts each row tile of h
// to that many vocab tiles (h is read by every vocab tile: at 256 rows it is half of what a 128 x 128 tile reads).
// kTwoPass: the first pass of the two-pass variant (the epilogue stores the logits; vocab_head_stats_rows_kernel
// follows).
template <int TileM, int TileN, class KernelSchedule, int ClusterM = 1, int ClusterN = 1, bool kTwoPass = false>
struct VocabStatsGemm {
  static constexpr int kTileM = TileM;
  static constexpr int kTileN = TileN;
  static constexpr bool kTwoPassGemm = kTwoPass;
  using Element = cutlass::bfloat16_t;
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;  // h [rows][hidden]
  using StrideB = cute::Stride<int64_t, cute::_1, int64_t>;  // E [vocab][hidden]
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using Epilogue = VocabStatsEpilogue<TileM, TileN, kTwoPass>;
  using CollectiveEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<Epilogue>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, StrideA, 8, Element, StrideB, 8, float, TileShape,
      ClusterShape, cutlass::gemm::collective::StageCountAutoCarveout<0>, KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device) {
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = cute::make_shape(static_cast<int>(l.rows), p.vocab, p.dim, 1);
    const StrideA sa{p.dim, {}, l.rows * p.dim};                           // rows `dim` apart, one batch
    const StrideB sb{p.dim, {}, static_cast<int64_t>(p.vocab) * p.dim};  // vocab rows `dim` apart
    args.mainloop = {reinterpret_cast<const Element*>(p.hidden), sa, reinterpret_cast<const Element*>(p.embed), sb};
    args.epilogue = {p, l};
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sms;
    args.scheduler.raster_order = cutlass::gemm::kernel::detail::RasterOrderOptions::AlongM;
    return args;
  }
};

// Vocab tiles of the statistics GEMM: the partials per row.
constexpr int64_t stats_tiles(int vocab, int tile_n) { return ceil_div(vocab, tile_n); }

// The two-pass variant's second pass: the columns of one partial (the one-pass epilogue's vocab tile) and the rows of
// one warp (a quad per row).
constexpr int kRowsPassTileN = 128;
constexpr int kRowsPassWarps = 8;

// Warp w of the grid folds rows 8·(w % row_groups) .. + 7 over vocab tile w / row_groups of the logits the first pass
// stored (every column of the tile; zeros for rows past the end, as TMA fills them), exactly as
// VocabStatsEpilogue<.., 128> folds an accumulator tile.
__global__ void __launch_bounds__(kRowsPassWarps * 32)
    vocab_head_stats_rows_kernel(const VocabHeadParams p, const VocabHeadLayout l) {
  pdl_begin();
  const int lane = threadIdx.x & 31, q = lane & 3;
  const int64_t row_groups = ceil_div(l.rows, 8);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kRowsPassWarps + (threadIdx.x >> 5);
  if (task >= row_groups * l.parts) return;  // the whole warp
  const int64_t tile = task / row_groups;
  const int64_t row = (task % row_groups) * 8 + (lane >> 2);
  const bool row_ok = row < l.rows;
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const float* logits = reinterpret_cast<const float*>(ws + l.cutlass) + (row_ok ? row : 0) * l.vocab_pad;
  const LogitMath math = logit_math(p);
  const RowStream stream = row_stream(p, row);
  const bool write_probs = p.soft != nullptr && row_ok;
  RowState st = empty_row_state();
#pragma unroll
  for (int c = 0; c < kRowsPassTileN / kChunk; ++c) {
    const int64_t col_base = tile * kRowsPassTileN + c * kChunk;
    float v[16];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 z = row_ok ? __ldcs(reinterpret_cast<const float2*>(logits + col_base + 8 * j + 2 * q))
                              : make_float2(0.f, 0.f);
      v[2 * j] = z.x;
      v[2 * j + 1] = z.y;
    }
    const int64_t chunk = col_base / kChunk;
    float* chunk_max = write_probs ? reinterpret_cast<float*>(ws + l.chunk_max) + chunk * l.rows_pad + row : nullptr;
    __nv_bfloat16* probs = write_probs ? reinterpret_cast<__nv_bfloat16*>(ws + l.probs) + row * l.vocab_pad : nullptr;
    fold_chunk(v, col_base, q, math, stream, st, chunk_max, probs, l.vocab_pad);
  }
  st = quad_merged(st);
  if (q == 0 && row_ok) reinterpret_cast<StatsPartial*>(ws + l.partials)[row * l.parts + tile] = stats_partial(st);
}

}  // namespace dgemma::kernels::vocab_head
