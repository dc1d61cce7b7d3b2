// The fused vocabulary head of one denoising step (see vocab_head_stats/accept/soft.cuh):
//   1. statistics + sampling pass over E (split across CTAs), 2. per-row merge of the partials,
//   3. entropy-bounded acceptance and stopping statistics per sequence,
//   4. (optional) self-conditioning input softmax(z)·E·scale, split-K, and its fixed-order reduction.
// Five launches on one stream; every output is written by exactly one launch. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/vocab_head_accept.cuh"
#include "kernels/vocab_head_params.cuh"
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

inline cudaError_t vocab_head_step(const VocabHeadParams& p, cudaStream_t stream) {
  const VocabHeadLayout l = VocabHeadLayout::make(p.batch, p.canvas, p.vocab, p.dim, p.stats_splits, p.soft_splits,
                                                  p.soft != nullptr);
  if (l.rows == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(vocab_head_stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kStatsSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 stats_grid(static_cast<unsigned>(l.rows_pad / kBM), static_cast<unsigned>(p.stats_splits));
  err = launch_kernel(vocab_head_stats_kernel, stats_grid, kThreads, kStatsSmemBytes, stream, p, l);
  if (err != cudaSuccess) return err;
  err = launch_kernel(vocab_head_merge_kernel, static_cast<unsigned>(ceil_div(l.rows, kMergeWarps)), kMergeWarps * 32,
                      0, stream, p, l);
  if (err != cudaSuccess) return err;
  const int accept_threads = static_cast<int>(ceil_div(p.canvas, 32) * 32);
  err = launch_kernel(vocab_head_accept_kernel, static_cast<unsigned>(p.batch), accept_threads, 0, stream, p);
  if (err != cudaSuccess) return err;
  if (p.soft == nullptr) return cudaSuccess;
  err = cudaFuncSetAttribute(vocab_head_soft_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kSoftSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 soft_grid(static_cast<unsigned>(ceil_div(p.dim, kBN)), static_cast<unsigned>(l.rows_pad / kBM),
                       static_cast<unsigned>(p.soft_splits));
  err = launch_kernel(vocab_head_soft_kernel, soft_grid, kThreads, kSoftSmemBytes, stream, p, l);
  if (err != cudaSuccess) return err;
  const int64_t quads = l.rows * p.dim / 4;
  return launch_kernel(vocab_head_soft_reduce_kernel, static_cast<unsigned>(ceil_div(quads, 256)), 256, 0, stream,
                       p, l);
}

}  // namespace dgemma::kernels::vocab_head
