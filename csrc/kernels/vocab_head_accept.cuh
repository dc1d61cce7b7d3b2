// Entropy-bounded acceptance and the stopping statistics of one denoising step, one CTA per sequence:
// positions are ranked by (entropy, index), the lowest-entropy prefix whose cumsum − current stays
// within the bound is accepted (always at least one), accepted positions take their sample and the
// others a uniform re-draw from the Philox stream. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pdl.cuh"
#include "kernels/philox.cuh"
#include "kernels/vocab_head_params.cuh"

namespace dgemma::kernels::vocab_head {

constexpr int kMaxCanvas = 1024;

__global__ void __launch_bounds__(kMaxCanvas) vocab_head_accept_kernel(const VocabHeadParams p) {
  pdl_begin();
  __shared__ float s_entropy[kMaxCanvas];
  __shared__ float s_sorted[kMaxCanvas];
  __shared__ bool s_selected[kMaxCanvas];
  __shared__ float s_mean;
  const int i = threadIdx.x, c = p.canvas;
  const int64_t seq = blockIdx.x;
  const int64_t row = seq * c + i;
  const bool valid = i < c;
  const float e = valid ? p.entropy[row] : 0.f;
  if (valid) s_entropy[i] = e;
  __syncthreads();
  int rank = 0;
  if (valid) {
    // NOTE: a stable rank (ties by index): O(C²) comparisons, 256 per thread for the 256-token canvas.
    // The order must be total so the ranks are a permutation of 0..c-1 and every s_sorted entry the
    // scan below reads is written: NaN sorts after every number (as torch.sort puts it), NaNs by index.
    const bool e_nan = isnan(e);
    for (int j = 0; j < c; ++j) {
      const float ej = s_entropy[j];
      const bool ej_nan = isnan(ej);
      const bool before = e_nan ? (ej_nan ? j < i : true) : (!ej_nan && ((ej < e) || (ej == e && j < i)));
      rank += before;
    }
    s_sorted[rank] = e;
  }
  __syncthreads();
  if (i == 0) {
    // NOTE: sequential double accumulation rounded to fp32 per element, as torch.cumsum does for fp32 on
    // the CPU; the comparison is then made in fp32 like the reference's `cumsum − sorted <= bound`.
    // A NaN entropy (sorted last) makes its own and every later comparison false, and the mean NaN.
    double run = 0.0, total = 0.0;
    for (int k = 0; k < c; ++k) {
      run += s_sorted[k];
      s_selected[k] = static_cast<float>(run) - s_sorted[k] <= p.entropy_bound;
      total += s_entropy[k];
    }
    s_mean = static_cast<float>(total / c);
  }
  __syncthreads();
  bool same = true;
  if (valid) {
    const bool accept = s_selected[rank];
    int64_t next = p.sample[row];
    if (!accept) {
      const uint64_t seed = head_seed(p);
      const Philox4x32 r = philox4x32_10(0u, static_cast<uint32_t>(i), head_step(p),
                                         philox_stream_word3(static_cast<uint32_t>(seq), kRedrawStream),
                                         static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      next = philox_uniform_below(r.v[0], static_cast<uint32_t>(p.vocab));
    }
    p.accepted[row] = accept;
    p.next_canvas[row] = next;
    same = p.argmax[row] == p.prev_argmax[row];
  }
  const bool stable = __syncthreads_and(same) != 0;
  if (i == 0) {
    const bool was_finished = p.finished_in != nullptr && p.finished_in[seq];
    p.mean_entropy[seq] = s_mean;
    p.stable[seq] = stable;
    p.finished_out[seq] = was_finished || (stable && s_mean < p.confidence);
  }
}

}  // namespace dgemma::kernels::vocab_head
