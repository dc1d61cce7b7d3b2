// The vocabulary head's two GEMMs on Hopper (csrc/ops/vocab_head_sm90.cu): CUTLASS sm90 TMA + wgmma kernels that
// the launcher in vocab_head.cuh calls in place of the mma.sync passes when VocabHeadParams::impl names them.
//   statistics: z tiles = h·Eᵀ (64 or 128 rows x 128 vocab ids, K = hidden) of a persistent, warp-specialised
//     ping-pong (or cooperative) GEMM, reduced in its epilogue (vocab_head_sm90_stats.cuh) into one StatsPartial
//     per (row, vocab tile) and, with self-conditioning, the bf16 q = exp(z − chunk max) and the chunk maxima;
//   self-conditioning: q rescaled in place to p = bf16(q·exp(chunk max − lse)) (one elementwise kernel), then
//     soft = bf16(scale·(p·E)) as a split-K GEMM (stream-K scheduler, deterministic reduction).
// Host declarations only; torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/vocab_head_params.cuh"

namespace dgemma::kernels::vocab_head {

struct Sm90Plan {
  int64_t parts = 0;       // statistics partials per row: one per vocab tile
  int soft_splits = 1;     // K splits of the P·E GEMM
  size_t cutlass_bytes = 0;  // the larger of the two GEMMs' workspaces (they run one after the other)
};

// Whether the P·E GEMM takes this vocabulary: TMA reads P's rows (K = vocab) in 16-byte units, so the vocabulary
// must be a multiple of 8 (262144 is); otherwise the wgmma statistics pass is followed by the mma.sync P·E pass,
// which reads the same stored probabilities.
constexpr bool sm90_soft_fits(int vocab) { return vocab % 8 == 0; }

// The plan of a kImplWgmma call; `sms`: the device's multiprocessor count. Sizes the P·E GEMM when with_soft and it
// fits.
// fp8_soft: the P·E pass in FP8 (VocabHeadParams::embed_fp8), its GEMM's workspace included.
Sm90Plan sm90_plan(int64_t rows, int vocab, int dim, int sms, bool with_soft, bool fp8_soft = false);

// The statistics GEMM of one call (writes l.partials, and l.probs / l.chunk_max when p.soft is set).
cudaError_t sm90_stats(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device, cudaStream_t stream);

// The P·E GEMM's split count and workspace bytes (vocab_head_sm90_soft.cu).
int sm90_soft_splits(int64_t rows, int dim, int vocab, int sms);
size_t sm90_soft_workspace(const VocabHeadParams& p, const VocabHeadLayout& l, int splits, int sms);
// The FP8 P·E GEMM's workspace bytes (its stream-K partial sums; p.embed_fp8 calls).
size_t sm90_soft_fp8_workspace(const VocabHeadParams& p, const VocabHeadLayout& l, int sms);

// The self-conditioning pass (after the merge kernel wrote p.lse): rescale, then the split-K P·E GEMM into p.soft;
// with p.embed_fp8, the e4m3 probabilities and the FP8 stream-K GEMM (vocab_head_sm90_soft.cuh).
cudaError_t sm90_soft(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device, cudaStream_t stream);

}  // namespace dgemma::kernels::vocab_head
