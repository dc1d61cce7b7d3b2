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

namespace dgemma::kernels::vocab_head {

// A finite "minus infinity": (sentinel − M)·0 stays 0 in the merge, where −inf would give NaN.
constexpr float kNegSentinel = -3.0e38f;
// The Gumbel noise −log(−log u) of an open uniform u ≤ 1 − 2^-24 is at most 16.64: a logit more than this
// below the best noisy score so far cannot win, so its random number is never computed.
constexpr float kGumbelBound = 17.f;
constexpr int kNoIndex = 0x7fffffff;

struct RowState {
  float m, s, t;  // running max and sums relative to it (see StatsPartial)
  float argmax_value;
  int argmax_index;
  float gumbel_value;
  int gumbel_index;
};

__device__ __forceinline__ RowState empty_row_state() {
  return RowState{kNegSentinel, 0.f, 0.f, -INFINITY, kNoIndex, -INFINITY, kNoIndex};
}

// Larger value wins; equal values go to the smaller index (torch.argmax returns the first maximum).
__device__ __forceinline__ bool wins(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

__device__ __forceinline__ void merge_sums(RowState& a, float m, float s, float t) {
  const float mx = fmaxf(a.m, m);
  const float fa = expf(a.m - mx), fb = expf(m - mx);
  a.t = fa * (a.t + (a.m - mx) * a.s) + fb * (t + (m - mx) * s);
  a.s = fa * a.s + fb * s;
  a.m = mx;
}

__device__ __forceinline__ void merge_state(RowState& a, const RowState& b) {
  merge_sums(a, b.m, b.s, b.t);
  if (wins(b.argmax_value, b.argmax_index, a.argmax_value, a.argmax_index)) {
    a.argmax_value = b.argmax_value;
    a.argmax_index = b.argmax_index;
  }
  if (wins(b.gumbel_value, b.gumbel_index, a.gumbel_value, a.gumbel_index)) {
    a.gumbel_value = b.gumbel_value;
    a.gumbel_index = b.gumbel_index;
  }
}

__device__ __forceinline__ RowState shfl_xor_state(const RowState& a, int mask) {
  RowState b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, mask);
  b.t = __shfl_xor_sync(0xffffffffu, a.t, mask);
  b.argmax_value = __shfl_xor_sync(0xffffffffu, a.argmax_value, mask);
  b.argmax_index = __shfl_xor_sync(0xffffffffu, a.argmax_index, mask);
  b.gumbel_value = __shfl_xor_sync(0xffffffffu, a.gumbel_value, mask);
  b.gumbel_index = __shfl_xor_sync(0xffffffffu, a.gumbel_index, mask);
  return b;
}

// cap·tanh(x/cap) = cap − 2cap/(exp(2x/cap) + 1): two MUFU ops; the clamp keeps the divisor below 2^126
// where __fdividef is exact enough (its result tends to 0 as the true quotient does).
__device__ __forceinline__ float softcap(float x, float cap, float two_over_cap) {
  const float e = __expf(fminf(x * two_over_cap, 80.f));
  return cap - __fdividef(2.f * cap, e + 1.f);
}

// Gumbel noise of one uniform word: −log(−log u).
__device__ __forceinline__ float gumbel_noise(uint32_t word) {
  return -logf(-logf(philox_open_uniform(word)));
}

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
  uint32_t stream_pos[4], stream_seq[4];
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    state[slot] = empty_row_state();
    const int64_t grow = row0 + warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
    stream_pos[slot] = static_cast<uint32_t>(grow % p.canvas);
    stream_seq[slot] = philox_stream_word3(static_cast<uint32_t>(grow / p.canvas), kSampleStream);
  }
  const uint64_t seed = head_seed(p);
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32), step = head_step(p);
  const float cap = p.softcap, two_over_cap = 2.f / p.softcap, inv_t = head_inv_temperature(p);

  auto epilogue = [&](int64_t vt) {
    const int64_t col_base = vt * kBN + warp_n * kWarpN;
    const int64_t chunk = col_base / kChunk;
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) {
      const int mi = slot >> 1, half = slot & 1;
      const int64_t grow = row0 + warp_m * kWarpM + mi * 16 + g + 8 * half;
      const bool row_ok = grow < rows;
      float local_max = kNegSentinel;
#pragma unroll
      for (int nj = 0; nj < 8; ++nj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float z = softcap(acc[mi][nj][2 * half + e], cap, two_over_cap) * inv_t;
          acc[mi][nj][2 * half + e] = z;
          if (col_base + nj * 8 + 2 * q + e < p.vocab) local_max = fmaxf(local_max, z);
        }
      local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 1));
      local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 2));
      if (write_probs && q == 0 && row_ok)
        reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + l.chunk_max)[chunk * l.rows_pad + grow] =
            local_max;
      float s = 0.f, t = 0.f;
      RowState& st = state[slot];
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const int64_t col = col_base + nj * 8 + 2 * q;
        const float z0 = acc[mi][nj][2 * half], z1 = acc[mi][nj][2 * half + 1];
        const bool ok0 = col < p.vocab, ok1 = col + 1 < p.vocab;
        const float e0 = ok0 ? __expf(z0 - local_max) : 0.f;
        const float e1 = ok1 ? __expf(z1 - local_max) : 0.f;
        s += e0 + e1;
        t = fmaf(e0, z0 - local_max, fmaf(e1, z1 - local_max, t));
        if (write_probs && row_ok) {
          __nv_bfloat16* probs = reinterpret_cast<__nv_bfloat16*>(static_cast<unsigned char*>(p.workspace) + l.probs);
          *reinterpret_cast<uint32_t*>(probs + grow * l.vocab_pad + col) = pack_bf16x2(e0, e1);
        }
        if (ok0 && z0 > st.argmax_value) {
          st.argmax_value = z0;
          st.argmax_index = static_cast<int>(col);
        }
        if (ok1 && z1 > st.argmax_value) {
          st.argmax_value = z1;
          st.argmax_index = static_cast<int>(col + 1);
        }
        if (ok0 && fmaxf(z0, ok1 ? z1 : z0) + kGumbelBound > st.gumbel_value) {
          const Philox4x32 r =
              philox4x32_10(static_cast<uint32_t>(col >> 2), stream_pos[slot], step, stream_seq[slot], key0, key1);
          const int w = static_cast<int>(col & 3);  // 0 or 2: this pair's two words
          const float g0 = z0 + gumbel_noise(w == 0 ? r.v[0] : r.v[2]);
          if (g0 > st.gumbel_value) {
            st.gumbel_value = g0;
            st.gumbel_index = static_cast<int>(col);
          }
          if (ok1) {
            const float g1 = z1 + gumbel_noise(w == 0 ? r.v[1] : r.v[3]);
            if (g1 > st.gumbel_value) {
              st.gumbel_value = g1;
              st.gumbel_index = static_cast<int>(col + 1);
            }
          }
        }
      }
      if (local_max != kNegSentinel) merge_sums(st, local_max, s, t);
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) acc[mi][nj][2 * half] = acc[mi][nj][2 * half + 1] = 0.f;
    }
  };

  cp_async_pipeline<kStages>(total, load_stage, compute_stage, [&](int it) {
    if (it % k_iters == k_iters - 1) epilogue(vt_begin + it / k_iters);
  });

  StatsPartial* partials = reinterpret_cast<StatsPartial*>(static_cast<unsigned char*>(p.workspace) + l.partials);
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    RowState st = state[slot];
    merge_state(st, shfl_xor_state(st, 1));
    merge_state(st, shfl_xor_state(st, 2));
    const int64_t grow = row0 + warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
    if (q == 0 && grow < rows) {
      partials[(grow * p.stats_splits + blockIdx.y) * 2 + warp_n] =
          StatsPartial{st.m, st.s, st.t, st.argmax_value, st.argmax_index, st.gumbel_value, st.gumbel_index, 0};
    }
  }
}

// One warp per row: merges the row's 2·splits partials in a fixed order (deterministic) and writes the
// row's max, log-sum-exp, entropy, argmax and sample.
constexpr int kMergeWarps = 8;

__global__ void __launch_bounds__(kMergeWarps * 32) vocab_head_merge_kernel(const VocabHeadParams p,
                                                                             const VocabHeadLayout l) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= l.rows) return;
  const int parts = 2 * p.stats_splits;
  const StatsPartial* partials =
      reinterpret_cast<const StatsPartial*>(static_cast<const unsigned char*>(p.workspace) + l.partials) +
      row * parts;
  RowState st = empty_row_state();
  for (int i = lane; i < parts; i += 32) {
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
    p.argmax[row] = st.argmax_index;
    p.sample[row] = st.gumbel_index;
  }
}

}  // namespace dgemma::kernels::vocab_head
