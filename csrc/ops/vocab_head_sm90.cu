// The vocabulary head's Hopper statistics GEMM and the plan of both GEMMs (kernels/vocab_head_sm90.h).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "kernels/pdl.cuh"
#include "kernels/sm90_fp8_cutlass.cuh"
#include "kernels/vocab_head_sm90.h"
#include "kernels/vocab_head_sm90_stats.cuh"
#include "ops/tensor_arg.h"

namespace dgemma::kernels::vocab_head {

namespace {

using PingpongStats = VocabStatsGemm<64, 128, cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
using PingpongClusterStats = VocabStatsGemm<64, 128, cutlass::gemm::KernelTmaWarpSpecializedPingpong, 2>;
using CooperativeStats = VocabStatsGemm<128, 128, cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
using CooperativeCluster2x2Stats = VocabStatsGemm<128, 128, cutlass::gemm::KernelTmaWarpSpecializedCooperative, 2, 2>;
// The two-pass variants' logits GEMMs (the second pass is vocab_head_stats_rows_kernel).
using TwoPassPingpongLogits = VocabStatsGemm<64, 128, cutlass::gemm::KernelTmaWarpSpecializedPingpong, 1, 1, true>;
using TwoPassCooperativeLogits =
    VocabStatsGemm<128, 128, cutlass::gemm::KernelTmaWarpSpecializedCooperative, 1, 1, true>;

// The statistics GEMM's variant, DGEMMA_VOCAB_HEAD_STATS (read once per process; a tuning switch for the benchmark
// sweep): "auto" (the default: "pingpong" up to kPingpongMaxRows rows, else "cooperative"), "pingpong_cluster2"
// (ping-pong, the embedding tile multicast to a cluster of two row tiles), "pingpong" (no cluster), "cooperative" or
// "cooperative_cluster2x2" (clusters of 2 x 2 tiles: the embedding tile multicast to two row tiles and h's tile to
// two vocab tiles, half the L2 reads of "cooperative"; not yet measured), "two_pass" / "two_pass_cooperative" (the
// GEMM's epilogue only stores the fp32 logits, ping-pong or cooperative, and a second kernel folds them: see
// vocab_head_sm90_stats.cuh; not yet measured).
// An unknown name is refused (ValueError naming it) by every call. On an H200 (bench/results/vocab_head_*.json, vocab
// 262144, hidden 2816): 256 rows 2.73 / 3.00 / 3.37 ms (pingpong / cooperative / pingpong_cluster2), 1024 rows
// 11.8 / 8.29 / 12.4 ms.
// NOTE: 128 vocab ids per tile: 256 (a 64 x 256 accumulator per warpgroup, 128 registers per thread) spills in this
// epilogue under the kernel's 168-register budget.
enum class StatsVariant {
  kAuto,
  kPingpongCluster2,
  kPingpong,
  kCooperative,
  kCooperativeCluster2x2,
  kTwoPass,
  kTwoPassCooperative
};
constexpr int64_t kPingpongMaxRows = 512;

StatsVariant stats_variant() {
  static const StatsVariant v = [] {
    const char* s = std::getenv("DGEMMA_VOCAB_HEAD_STATS");
    if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return StatsVariant::kAuto;
    if (std::strcmp(s, "pingpong_cluster2") == 0) return StatsVariant::kPingpongCluster2;
    if (std::strcmp(s, "pingpong") == 0) return StatsVariant::kPingpong;
    if (std::strcmp(s, "cooperative") == 0) return StatsVariant::kCooperative;
    if (std::strcmp(s, "cooperative_cluster2x2") == 0) return StatsVariant::kCooperativeCluster2x2;
    if (std::strcmp(s, "two_pass") == 0) return StatsVariant::kTwoPass;
    if (std::strcmp(s, "two_pass_cooperative") == 0) return StatsVariant::kTwoPassCooperative;
    ::dgemma::throw_invalid(std::string("DGEMMA_VOCAB_HEAD_STATS=") + s +
                            " is not a statistics GEMM variant (auto, pingpong_cluster2, pingpong, cooperative, "
                            "cooperative_cluster2x2, two_pass, two_pass_cooperative)");
  }();
  return v;
}

// fn(the statistics GEMM of a problem of `rows` rows). Every variant has 128-wide vocab tiles (the same layout).
template <class Fn>
auto with_stats_gemm(int64_t rows, Fn&& fn) {
  StatsVariant v = stats_variant();
  if (v == StatsVariant::kAuto) v = rows <= kPingpongMaxRows ? StatsVariant::kPingpong : StatsVariant::kCooperative;
  switch (v) {
    case StatsVariant::kPingpong:
      return fn(PingpongStats{});
    case StatsVariant::kCooperative:
      return fn(CooperativeStats{});
    case StatsVariant::kCooperativeCluster2x2:
      return fn(CooperativeCluster2x2Stats{});
    case StatsVariant::kTwoPass:
      return fn(TwoPassPingpongLogits{});
    case StatsVariant::kTwoPassCooperative:
      return fn(TwoPassCooperativeLogits{});
    default:
      return fn(PingpongClusterStats{});
  }
}

// The shared-memory ring the builder sized (StageCountAutoCarveout) must fit one SM's 227 KiB with the kernel's
// other shared storage.
static_assert(PingpongStats::Kernel::SharedStorageSize <= 232448, "the statistics GEMM's shared memory");
static_assert(PingpongClusterStats::Kernel::SharedStorageSize <= 232448, "the statistics GEMM's shared memory");
static_assert(CooperativeStats::Kernel::SharedStorageSize <= 232448, "the statistics GEMM's shared memory");
static_assert(CooperativeCluster2x2Stats::Kernel::SharedStorageSize <= 232448, "the statistics GEMM's shared memory");
static_assert(TwoPassPingpongLogits::Kernel::SharedStorageSize <= 232448, "the logits GEMM's shared memory");
static_assert(TwoPassCooperativeLogits::Kernel::SharedStorageSize <= 232448, "the logits GEMM's shared memory");
// The second pass folds 128-column tiles: one partial per first-pass tile.
static_assert(TwoPassPingpongLogits::kTileN == kRowsPassTileN && TwoPassCooperativeLogits::kTileN == kRowsPassTileN,
              "a two-pass partial covers one logits tile's columns");

}  // namespace

namespace {

// The plan of one problem: the GEMMs' arguments built only for their workspace sizes.
Sm90Plan make_plan(int64_t rows, int vocab, int dim, int sms, bool with_soft, bool fp8_soft) {
  Sm90Plan plan;
  VocabHeadParams p{};
  p.vocab = vocab;
  p.dim = dim;
  p.canvas = 1;
  p.batch = static_cast<int>(rows);
  const VocabHeadLayout l = VocabHeadLayout::make(static_cast<int>(rows), 1, vocab, dim, 0, 0, 0, with_soft);
  with_stats_gemm(rows, [&](auto g) {
    using G = decltype(g);
    plan.parts = stats_tiles(vocab, G::kTileN);
    // Two passes: the logits first, then the GEMM's own workspace.
    plan.cutlass_bytes = (G::kTwoPassGemm ? vocab_head_logits_bytes(l) : 0) +
                         G::Gemm::get_workspace_size(G::arguments(p, l, sms, 0));
    return 0;
  });
  if (with_soft && sm90_soft_fits(vocab)) {
    plan.soft_splits = sm90_soft_splits(rows, dim, vocab, sms);
    plan.cutlass_bytes = std::max(plan.cutlass_bytes,
                                  fp8_soft ? sm90_soft_fp8_workspace(p, l, sms)
                                           : sm90_soft_workspace(p, l, plan.soft_splits, sms));
  }
  return plan;
}

}  // namespace

// NOTE: remembered per problem: every denoising step of a generation asks the same one.
Sm90Plan sm90_plan(int64_t rows, int vocab, int dim, int sms, bool with_soft, bool fp8_soft) {
  using Key = std::tuple<int64_t, int, int, int, bool, bool>;
  static std::mutex mutex;
  static std::map<Key, Sm90Plan> plans;
  const Key key{rows, vocab, dim, sms, with_soft, fp8_soft};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, make_plan(rows, vocab, dim, sms, with_soft, fp8_soft)).first;
  return it->second;
}

cudaError_t sm90_stats(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device, cudaStream_t stream) {
  return with_stats_gemm(l.rows, [&](auto g) {
    using G = decltype(g);
    if (l.parts != stats_tiles(p.vocab, G::kTileN)) return cudaErrorInvalidValue;  // a layout of another plan
    unsigned char* ws = static_cast<unsigned char*>(p.workspace) + l.cutlass;
    const size_t room = l.total - l.cutlass;
    if constexpr (!G::kTwoPassGemm) {
      return run_cutlass<G>(G::arguments(p, l, sms, device), ws, room, device, stream);
    } else {
      const size_t logits = vocab_head_logits_bytes(l);  // then the GEMM's own workspace
      if (room < logits) return cudaErrorInvalidValue;
      const cudaError_t err = run_cutlass<G>(G::arguments(p, l, sms, device), ws + logits, room - logits, device, stream);
      if (err != cudaSuccess) return err;
      const int64_t warps = ceil_div(l.rows, 8) * l.parts;
      return launch_kernel(vocab_head_stats_rows_kernel, static_cast<unsigned>(ceil_div(warps, kRowsPassWarps)),
                           kRowsPassWarps * 32, 0, stream, p, l);
    }
  });
}

}  // namespace dgemma::kernels::vocab_head
