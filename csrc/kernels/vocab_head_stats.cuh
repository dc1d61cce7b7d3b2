// Pass 1 of the fused vocabulary head: tiles of z = softcap(h·Eᵀ)/t are produced on tensor cores and
// reduced on the fly into per-row max, Σexp, Σexp·z, argmax and a Gumbel-max sample; no fp32 logits
// tensor is ever written. Each CTA owns 128 rows and a contiguous run of 128-wide vocab tiles; its
// partials are merged per row by a second, tiny kernel. Optionally the pass also stores the bf16
// probabilities exp(z − chunk max) that the self-conditioning pass multiplies with E. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pdl.cuh"
#include "kernels/philox.cuh"
#include "kernels/vocab_head_mma.cuh"
#include "kernels/vocab_head_params.cuh"
#include "kernels/vocab_head_rows.cuh"

namespace dgemma::kernels::vocab_head {

__global__ void __launch_bounds__(kThreads, 1) vocab_head_stats_kernel(const VocabHeadParams p,
                                                                        const VocabHeadLayout l) {
  pdl_begin();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* s_a = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* s_b = s_a + kStages * kBM * kBK;
  static_assert(kBM == kBN, "A and B tiles are loaded by one loop");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int g = lane >> 2, q = lane & 3;
  const int64_t rows = l.rows;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n_vtiles = static_cast<int>(l.vocab_pad / kBN);
  const int per_split = static_cast<int>(ceil_div(n_vtiles, p.stats_splits));
  const int vt_begin = static_cast<int>(blockIdx.y) * per_split;
  const int vt_end = min(n_vtiles, vt_begin + per_split);
  const int k_iters = p.dim / kBK;
  const int total = max(0, vt_end - vt_begin) * k_iters;
  const bool write_probs = p.soft != nullptr;

  auto load_stage = [&](int it) {
    const int stage = it % kStages;
    const int64_t vt = vt_begin + it / k_iters;
    const int k0 = (it % k_iters) * kBK;
    __nv_bfloat16* a = s_a + stage * kBM * kBK;
    __nv_bfloat16* b = s_b + stage * kBN * kBK;
#pragma unroll
    for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
      const int r = c >> 3, ch = c & 7;
      const int dst = r * kBK + swizzle_chunk(r, ch) * 8;
      const int64_t grow = row0 + r;
      const bool row_ok = grow < rows;
      cp_async_16(a + dst, p.hidden + (row_ok ? grow : 0) * p.dim + k0 + ch * 8, row_ok ? 16 : 0);
      const int64_t v = vt * kBN + r;
      const bool v_ok = v < p.vocab;
      cp_async_16(b + dst, p.embed + (v_ok ? v : 0) * p.dim + k0 + ch * 8, v_ok ? 16 : 0);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nj = 0; nj < 8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

  auto compute_stage = [&](int stage) {
    const __nv_bfloat16* a = s_a + stage * kBM * kBK;
    const __nv_bfloat16* b = s_b + stage * kBN * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = warp_m * kWarpM + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], a + r * kBK + swizzle_chunk(r, kk * 2 + (lane >> 4)) * 8);
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        uint32_t bf[4];
        const int r = warp_n * kWarpN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(bf, b + r * kBK + swizzle_chunk(r, kk * 2 + ((lane >> 3) & 1)) * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_bf16_16816(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
          mma_bf16_16816(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
        }
      }
    }
  };

  // This thread's four rows (slot = 2·mi + half): fixed for the whole CTA.
  RowState state[4];
  RowStream streams[4];
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    state[slot] = empty_row_state();
    const int64_t grow = row0 + warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
    streams[slot] = row_stream(p, grow);
  }
  const LogitMath math = logit_math(p);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);

  auto epilogue = [&](int64_t vt) {
    const int64_t col_base = vt * kBN + warp_n * kWarpN;
    const int64_t chunk = col_base / kChunk;
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) {
      const int mi = slot >> 1, half = slot & 1;
      const int64_t grow = row0 + warp_m * kWarpM + mi * 16 + g + 8 * half;
      const bool row_ok = grow < rows;
      float v[16];
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        v[2 * nj] = acc[mi][nj][2 * half];
        v[2 * nj + 1] = acc[mi][nj][2 * half + 1];
        acc[mi][nj][2 * half] = acc[mi][nj][2 * half + 1] = 0.f;
      }
      float* chunk_max =
          write_probs && row_ok ? reinterpret_cast<float*>(ws + l.chunk_max) + chunk * l.rows_pad + grow : nullptr;
      __nv_bfloat16* probs =
          write_probs && row_ok ? reinterpret_cast<__nv_bfloat16*>(ws + l.probs) + grow * l.vocab_pad : nullptr;
      fold_chunk(v, col_base, q, math, streams[slot], state[slot], chunk_max, probs, l.vocab_pad);
    }
  };

  cp_async_pipeline<kStages>(total, load_stage, compute_stage, [&](int it) {
    if (it % k_iters == k_iters - 1) epilogue(vt_begin + it / k_iters);
  });

  StatsPartial* partials = reinterpret_cast<StatsPartial*>(ws + l.partials);
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    const RowState st = quad_merged(state[slot]);
    const int64_t grow = row0 + warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
    if (q == 0 && grow < rows) partials[grow * l.parts + blockIdx.y * 2 + warp_n] = stats_partial(st);
  }
}

// One warp per row: merges the row's l.parts partials (two per split of the mma.sync pass above, one per vocab
// tile of the wgmma pass) in a fixed order (deterministic) and writes the
// row's max, log-sum-exp, entropy, argmax and sample.
constexpr int kMergeWarps = 8;

__global__ void __launch_bounds__(kMergeWarps * 32) vocab_head_merge_kernel(const VocabHeadParams p,
                                                                             const VocabHeadLayout l) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= l.rows) return;
  const int64_t parts = l.parts;
  const StatsPartial* partials =
      reinterpret_cast<const StatsPartial*>(static_cast<const unsigned char*>(p.workspace) + l.partials) +
      row * parts;
  RowState st = empty_row_state();
  for (int64_t i = lane; i < parts; i += 32) {
    const StatsPartial x = partials[i];
    merge_state(st, RowState{x.m, x.s, x.t, x.argmax_value, x.argmax_index, x.gumbel_value, x.gumbel_index});
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) merge_state(st, shfl_xor_state(st, mask));
  if (lane == 0) {
    const float log_s = logf(st.s);
    p.max_logit[row] = st.m;
    p.lse[row] = st.m + log_s;
    p.entropy[row] = log_s - st.t / st.s;
    // A row whose logits are all NaN has no winner: token 0 (torch.argmax's answer there), never an index
    // outside the vocabulary. Its entropy is NaN, so it is never accepted.
    p.argmax[row] = st.argmax_index == kNoIndex ? 0 : st.argmax_index;
    p.sample[row] = st.gumbel_index == kNoIndex ? 0 : st.gumbel_index;
  }
}

}  // namespace dgemma::kernels::vocab_head
