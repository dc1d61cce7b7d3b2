// The fused vocabulary head of one denoising step (see vocab_head_stats/accept/soft.cuh):
//   1. statistics + sampling pass over E (split across CTAs), 2. per-row merge of the partials,
//   3. entropy-bounded acceptance and stopping statistics per sequence,
//   4. (optional) self-conditioning input softmax(z)·E·scale, split-K, and its fixed-order reduction.
// Five launches on one stream; every output is written by exactly one launch. Torch-free. With
// VocabHeadParams::impl = kImplWgmma, passes 1 and 4 are the CUTLASS sm90 GEMMs of vocab_head_sm90.h (pass 4: a
// rescale of the stored probabilities, then the split-K GEMM, which reduces its splits itself).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/vocab_head_accept.cuh"
#include "kernels/vocab_head_params.cuh"
#include "kernels/vocab_head_sm90.h"
#include "kernels/vocab_head_soft.cuh"
#include "kernels/vocab_head_stats.cuh"

namespace dgemma::kernels::vocab_head {

// The launch split counts for a problem on a device with `sms` multiprocessors (one CTA per SM):
// enough CTAs for one full wave of the statistics pass, and the smallest split of the P·E pass whose
// waves are at least 90% full (b1: 2 row tiles x 22 column tiles x 3 = 132 CTAs).
struct VocabHeadSplits {
  int stats = 1, soft = 1;
};

inline VocabHeadSplits choose_splits(int64_t rows, int vocab, int dim, int sms) {
  VocabHeadSplits s;
  const int64_t row_tiles = ceil_div(rows, kBM);
  const int64_t vocab_tiles = ceil_div(vocab, kBN);
  s.stats = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(vocab_tiles, sms / row_tiles)));
  const int64_t out_tiles = row_tiles * ceil_div(dim, kBN);
  const int64_t k_slices = ceil_div(vocab, kBN) * (kBN / kBK);
  for (int split = 1; split <= 16 && split <= k_slices; ++split) {
    const int64_t ctas = out_tiles * split;
    const int64_t waves = ceil_div(ctas, sms);
    s.soft = split;
    if (ctas * 10 >= waves * sms * 9) break;
  }
  return s;
}

// The launch plan of one call of implementation `impl` (kImpl*): split counts and the workspace layout.
struct VocabHeadPlan {
  VocabHeadSplits splits;
  VocabHeadLayout layout;
  bool wgmma_soft = false;  // VocabHeadParams::wgmma_soft
};

// fp8_soft: the FP8 P·E pass (VocabHeadParams::embed_fp8; kImplWgmma with self-conditioning and a vocabulary the
// GEMM takes: fp8_soft_supported).
inline bool fp8_soft_supported(int impl, int vocab, bool with_soft) {
  return impl == kImplWgmma && with_soft && sm90_soft_fits(vocab);
}

inline VocabHeadPlan plan_head(int impl, int batch, int canvas, int vocab, int dim, int sms, bool with_soft,
                               bool fp8_soft = false) {
  VocabHeadPlan plan;
  const int64_t rows = static_cast<int64_t>(batch) * canvas;
  fp8_soft = fp8_soft && fp8_soft_supported(impl, vocab, with_soft);
  if (impl == kImplWgmma) {
    const Sm90Plan sp = sm90_plan(rows, vocab, dim, sms, with_soft, fp8_soft);
    plan.wgmma_soft = with_soft && sm90_soft_fits(vocab);
    plan.splits.stats = 1;
    // The mma.sync P·E pass where the GEMM does not take the vocabulary (its split-K partial sums then).
    plan.splits.soft = plan.wgmma_soft ? sp.soft_splits : choose_splits(rows, vocab, dim, sms).soft;
    plan.layout = VocabHeadLayout::make(batch, canvas, vocab, dim, sp.parts, plan.wgmma_soft ? 0 : plan.splits.soft,
                                        sp.cutlass_bytes, with_soft, fp8_soft);
  } else {
    plan.splits = choose_splits(rows, vocab, dim, sms);
    plan.layout = VocabHeadLayout::make(batch, canvas, vocab, dim, 2 * plan.splits.stats, plan.splits.soft, 0,
                                        with_soft);
  }
  return plan;
}

// One call: p as the launcher filled it (p.impl, p.wgmma_soft, the split counts and workspace of plan_head's plan), l
// the plan's layout.
inline cudaError_t vocab_head_step(const VocabHeadParams& p, const VocabHeadLayout& l, int sms, int device,
                                   cudaStream_t stream) {
  if (l.rows == 0) return cudaSuccess;
  const bool wgmma = p.impl == kImplWgmma;
  cudaError_t err;
  if (wgmma) {
    err = sm90_stats(p, l, sms, device, stream);
  } else {
    const dim3 stats_grid(static_cast<unsigned>(l.rows_pad / kBM), static_cast<unsigned>(p.stats_splits));
    err = launch_kernel_smem<vocab_head_stats_kernel>(stats_grid, kThreads, kStatsSmemBytes, stream, p, l);
  }
  if (err != cudaSuccess) return err;
  err = launch_kernel(vocab_head_merge_kernel, static_cast<unsigned>(ceil_div(l.rows, kMergeWarps)), kMergeWarps * 32,
                      0, stream, p, l);
  if (err != cudaSuccess) return err;
  const int accept_threads = static_cast<int>(ceil_div(p.canvas, 32) * 32);
  err = launch_kernel(vocab_head_accept_kernel, static_cast<unsigned>(p.batch), accept_threads, 0, stream, p);
  if (err != cudaSuccess) return err;
  if (p.soft == nullptr) return cudaSuccess;
  if (p.wgmma_soft) return sm90_soft(p, l, sms, device, stream);
  const dim3 soft_grid(static_cast<unsigned>(ceil_div(p.dim, kBN)), static_cast<unsigned>(l.rows_pad / kBM),
                       static_cast<unsigned>(p.soft_splits));
  err = launch_kernel_smem<vocab_head_soft_kernel>(soft_grid, kThreads, kSoftSmemBytes, stream, p, l);
  if (err != cudaSuccess) return err;
  const int64_t quads = l.rows * p.dim / 4;
  return launch_kernel(vocab_head_soft_reduce_kernel, static_cast<unsigned>(ceil_div(quads, 256)), 256, 0, stream,
                       p, l);
}

}  // namespace dgemma::kernels::vocab_head
