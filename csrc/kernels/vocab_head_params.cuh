// The plain parameter struct of one fused vocabulary-head call and its workspace layout. Shared by the
// kernels (device) and the launcher (host); torch-free.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels::vocab_head {

// Tile shape of both GEMMs (h·Eᵀ and P·E): 128x128 output tiles, 64-deep k slices, 8 warps as 4 (M) x 2
// (N), each warp owning a 32x64 sub-tile. kStages-deep cp.async pipeline, one CTA per SM.
constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kWarpM = 32;
constexpr int kWarpN = 64;
// NOTE: probabilities are stored per 64-column chunk relative to that chunk's row maximum (one warp's N
// extent in the statistics pass, one k slice of the P·E pass), so the scale is one float per (chunk, row).
constexpr int kChunk = kWarpN;
static_assert(kChunk == kBK, "the P·E pass applies one scale per (row, k slice)");

constexpr size_t kTileBytes = static_cast<size_t>(kBM) * kBK * sizeof(__nv_bfloat16);
constexpr size_t kStatsSmemBytes = kStages * 2 * kTileBytes;
constexpr size_t kSoftSmemBytes = kStages * (2 * kTileBytes + kBM * sizeof(float));

// The implementations of the head's two GEMMs (the surrounding kernels are shared):
//   kImplMmaSync: mma.sync + cp.async kernels (vocab_head_stats.cuh / vocab_head_soft.cuh);
//   kImplWgmma: CUTLASS sm90 TMA + wgmma GEMMs (vocab_head_sm90.h): the statistics in a custom epilogue over
//   64x128 (ping-pong) or 128x128 (cooperative) logit tiles, and P·E as a split-K GEMM.
constexpr int kImplMmaSync = 0;
constexpr int kImplWgmma = 1;
constexpr int kImplCount = 2;

// Per (row, part) partial of the statistics pass (a part: one warp column of one split of the mma.sync pass,
// one vocab tile of the wgmma pass). The sums are relative to m:
// s = Σ exp(z − m), t = Σ exp(z − m)·(z − m), so entropy = log s − t/s without cancellation.
struct StatsPartial {
  float m;
  float s;
  float t;
  float argmax_value;
  int32_t argmax_index;
  float gumbel_value;
  int32_t gumbel_index;
  int32_t pad;
};

struct VocabHeadParams {
  // inputs
  const __nv_bfloat16* hidden;  // [rows, dim], rows = batch * canvas
  const __nv_bfloat16* embed;   // [vocab, dim]
  const int64_t* prev_argmax;   // [batch, canvas]
  const bool* finished_in;      // [batch] or nullptr
  int batch = 0, canvas = 0, vocab = 0, dim = 0;
  float inv_temperature = 1.f;
  float softcap = 30.f;
  float entropy_bound = 0.1f;
  float confidence = 0.005f;
  float soft_scale = 1.f;
  uint64_t seed = 0;
  uint32_t step = 0;
  // Optional device-resident step scalars, read by the kernels instead of seed/step/inv_temperature above
  // (a CUDA graph replays one launch for every step): int64 [2] = (seed bits, step), fp32 [1] temperature.
  const int64_t* device_seed_step = nullptr;
  const float* device_temperature = nullptr;
  // outputs ([batch, canvas] unless noted)
  float* max_logit;
  float* lse;
  float* entropy;
  int64_t* argmax;
  int64_t* sample;
  bool* accepted;
  int64_t* next_canvas;
  float* mean_entropy;    // [batch]
  bool* stable;           // [batch]
  bool* finished_out;     // [batch]
  __nv_bfloat16* soft;    // [rows, dim] or nullptr (no self-conditioning pass)
  // Optional FP8 self-conditioning operand (the wgmma P·E pass then runs in FP8, vocab_head_sm90_soft.cuh): E
  // transposed and quantised per hidden channel, e4m3 [dim, vocab_pad] (zero past the vocabulary), and its scales
  // [dim] (E[v, c] ≈ embed_fp8[c, v] · embed_fp8_scale[c]).
  const uint8_t* embed_fp8 = nullptr;
  const float* embed_fp8_scale = nullptr;
  // launch shape and workspace (see VocabHeadLayout)
  int impl = kImplMmaSync;  // which GEMMs (kImpl*)
  bool wgmma_soft = false;  // the P·E pass on the wgmma GEMM (kImplWgmma where the vocabulary allows it)
  int stats_splits = 1;   // vocab splits of the statistics pass
  int soft_splits = 1;    // vocab splits of the P·E pass
  void* workspace = nullptr;
};

#ifdef __CUDACC__
// The step scalars of a call, from device memory where the launcher passed them there.
__device__ __forceinline__ uint64_t head_seed(const VocabHeadParams& p) {
  return p.device_seed_step != nullptr ? static_cast<uint64_t>(p.device_seed_step[0]) : p.seed;
}
__device__ __forceinline__ uint32_t head_step(const VocabHeadParams& p) {
  return p.device_seed_step != nullptr ? static_cast<uint32_t>(p.device_seed_step[1]) : p.step;
}
// NOTE: 1/t in double rounded once to float, exactly as the launcher computes inv_temperature on the host.
__device__ __forceinline__ float head_inv_temperature(const VocabHeadParams& p) {
  return p.device_temperature != nullptr
             ? static_cast<float>(1.0 / static_cast<double>(*p.device_temperature))
             : p.inv_temperature;
}
#endif

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Byte offsets into the one workspace buffer.
struct VocabHeadLayout {
  int64_t rows = 0, rows_pad = 0, vocab_pad = 0, chunks = 0;
  int64_t parts = 0;  // statistics partials per row
  size_t partials = 0, probs = 0, chunk_max = 0, soft_partial = 0, probs_fp8 = 0, soft_row_scale = 0, cutlass = 0,
         total = 0;

  // parts: partials per row; soft_splits: fp32 split-K partial sums of the mma.sync P·E pass (0: none);
  // cutlass_bytes: the CUTLASS GEMMs' own workspace (the wgmma passes; 0: none); fp8_soft: room for the FP8 P·E
  // pass's operand (e5m2 probabilities [rows, vocab_pad]) and its per-row scales.
  static VocabHeadLayout make(int batch, int canvas, int vocab, int dim, int64_t parts, int soft_splits,
                              size_t cutlass_bytes, bool with_soft, bool fp8_soft = false) {
    VocabHeadLayout l;
    l.rows = static_cast<int64_t>(batch) * canvas;
    l.rows_pad = ceil_div(l.rows, kBM) * kBM;
    l.vocab_pad = ceil_div(vocab, kBN) * kBN;
    l.chunks = l.vocab_pad / kChunk;
    l.parts = parts;
    size_t off = 0;
    l.partials = off;
    off = align_up(off + static_cast<size_t>(l.rows) * parts * sizeof(StatsPartial), 256);
    if (with_soft) {
      // NOTE: bf16 probabilities exp(z − chunk max), [rows, vocab_pad]; fp32 chunk maxima [chunks, rows_pad]
      // (chunk-major so one k slice of the P·E pass reads 128 consecutive floats); split-K partial sums.
      l.probs = off;
      off = align_up(off + static_cast<size_t>(l.rows) * l.vocab_pad * sizeof(__nv_bfloat16), 256);
      l.chunk_max = off;
      off = align_up(off + static_cast<size_t>(l.chunks) * l.rows_pad * sizeof(float), 256);
      l.soft_partial = off;
      off = align_up(off + static_cast<size_t>(soft_splits) * l.rows * dim * sizeof(float), 256);
      if (fp8_soft) {
        l.probs_fp8 = off;
        off = align_up(off + static_cast<size_t>(l.rows) * l.vocab_pad, 256);
        l.soft_row_scale = off;
        off = align_up(off + static_cast<size_t>(l.rows) * sizeof(float), 256);
      }
    }
    l.cutlass = off;
    off = align_up(off + cutlass_bytes, 256);
    l.total = off;
    return l;
  }
};

}  // namespace dgemma::kernels::vocab_head
