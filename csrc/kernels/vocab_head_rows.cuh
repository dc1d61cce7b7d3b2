// The per-row reduction state of the vocabulary head's statistics passes (the mma.sync kernel in
// vocab_head_stats.cuh and the wgmma GEMM epilogue in vocab_head_sm90_stats.cuh) and the per-element math
// they share, so both passes compute every logit's contribution identically. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/philox.cuh"
#include "kernels/vocab_head_params.cuh"
#include "kernels/warp_mma_sm80.cuh"

namespace dgemma::kernels::vocab_head {

// A finite "minus infinity": (sentinel − M)·0 stays 0 in the merge, where −inf would give NaN.
constexpr float kNegSentinel = -3.0e38f;
// The Gumbel noise −log(−log u) of an open uniform u ≤ 1 − 2^-24 is at most 16.64: a logit more than this
// below the best noisy score so far cannot win, so a chunk draws no noise where no logit of its warp is closer.
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
// where __fdividef is exact enough (its result tends to 0 as the true quotient does). A NaN stays NaN (fminf would
// return the 80: a NaN hidden state would then look like a confident logit).
__device__ __forceinline__ float softcap(float x, float cap, float two_over_cap) {
  const float y = x * two_over_cap;
  const float e = __expf(y > 80.f ? 80.f : y);
  return cap - __fdividef(2.f * cap, e + 1.f);
}

// Gumbel noise of one uniform word: −log(−log u).
__device__ __forceinline__ float gumbel_noise(uint32_t word) {
  return -logf(-logf(philox_open_uniform(word)));
}

// The step's constants of the per-logit math.
struct LogitMath {
  float cap, two_over_cap, inv_t;
  uint32_t key0, key1, step;
  int vocab;
};

// The Philox counter words of one canvas row's sample stream: (position, sequence << 2 | purpose).
struct RowStream {
  uint32_t pos, seq;
};

// The step's LogitMath of a call (its scalars from device memory where the launcher passed them there).
__device__ __forceinline__ LogitMath logit_math(const VocabHeadParams& p) {
  const uint64_t seed = head_seed(p);
  return LogitMath{p.softcap, 2.f / p.softcap, head_inv_temperature(p), static_cast<uint32_t>(seed),
                   static_cast<uint32_t>(seed >> 32), head_step(p), p.vocab};
}

// The sample stream of canvas row `row` (batch · canvas + position) of a call.
__device__ __forceinline__ RowStream row_stream(const VocabHeadParams& p, int64_t row) {
  return RowStream{static_cast<uint32_t>(row % p.canvas),
                   philox_stream_word3(static_cast<uint32_t>(row / p.canvas), kSampleStream)};
}

// Folds one row's 64-column chunk into `st`. The chunk is held by the four lanes of a quad (lane q holds
// columns col_base + 8·j + 2q + {0, 1}, j < 8, as raw accumulators acc[2j + e]): processed logits
// z = softcap(acc)·(1/t), the chunk maximum (all four lanes; written to *chunk_max_out by lane 0 when given),
// Σexp(z − max), Σexp(z − max)·(z − max), argmax, the Gumbel-max sample, and the bf16 q = exp(z − max) at
// probs_row[col] for col < probs_end (when probs_row is given). Columns >= vocab count for nothing. Every lane
// of the warp must call it (shuffles).
__device__ __forceinline__ void fold_chunk(float (&acc)[16], int64_t col_base, int q, const LogitMath& k,
                                           RowStream rs, RowState& st, float* chunk_max_out,
                                           __nv_bfloat16* probs_row, int64_t probs_end) {
  float local_max = kNegSentinel;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float z = softcap(acc[2 * j + e], k.cap, k.two_over_cap) * k.inv_t;
      acc[2 * j + e] = z;
      if (col_base + j * 8 + 2 * q + e < k.vocab) local_max = fmaxf(local_max, z);
    }
  local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 1));
  local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 2));
  if (chunk_max_out != nullptr && q == 0) *chunk_max_out = local_max;
  float s = 0.f, t = 0.f;
  // The row's best noisy score when the chunk starts bounds the chunk's candidates (kGumbelBound): the best only
  // grows, so a logit this bound rules out could not have won later in the chunk either.
  const float gumbel_bound = st.gumbel_value;
  bool candidates = false;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t col = col_base + j * 8 + 2 * q;
    const float z0 = acc[2 * j], z1 = acc[2 * j + 1];
    const bool ok0 = col < k.vocab, ok1 = col + 1 < k.vocab;
    const float e0 = ok0 ? __expf(z0 - local_max) : 0.f;
    const float e1 = ok1 ? __expf(z1 - local_max) : 0.f;
    s += e0 + e1;
    t = fmaf(e0, z0 - local_max, fmaf(e1, z1 - local_max, t));
    if (probs_row != nullptr && col < probs_end)
      *reinterpret_cast<uint32_t*>(probs_row + col) = pack_bf16x2(e0, e1);
    if (ok0 && z0 > st.argmax_value) {
      st.argmax_value = z0;
      st.argmax_index = static_cast<int>(col);
    }
    if (ok1 && z1 > st.argmax_value) {
      st.argmax_value = z1;
      st.argmax_index = static_cast<int>(col + 1);
    }
    candidates = candidates || (ok0 && fmaxf(z0, ok1 ? z1 : z0) + kGumbelBound > gumbel_bound);
  }
  // The Gumbel-max sample, for the whole warp at once where any lane has a candidate (every logit's noise then: a
  // non-candidate's score cannot beat the best, so the winner is the same). Lanes q and q ^ 1 draw from the same
  // Philox counter (column / 4: q even takes words 0 and 1, q odd words 2 and 3), so each of the pair computes the
  // block of every other j and hands its partner the two words it needs: four Philox calls per lane, not eight,
  // and eight independent chains rather than one waiting on the previous column's comparison.
  if (__any_sync(0xffffffffu, candidates)) {
    const bool odd = (q & 1) != 0;
    uint32_t word[8][2];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      // This lane's block: j = 2m + odd, counter (col_base + 8j + 2q) / 4 (col_base is a multiple of 64).
      const uint32_t ctr = static_cast<uint32_t>((col_base >> 2) + 2 * (2 * m + (odd ? 1 : 0)) + (q >> 1));
      const Philox4x32 r = philox4x32_10(ctr, rs.pos, k.step, rs.seq, k.key0, k.key1);
      const uint32_t own0 = odd ? r.v[2] : r.v[0], own1 = odd ? r.v[3] : r.v[1];
      const uint32_t got0 = __shfl_xor_sync(0xffffffffu, odd ? r.v[0] : r.v[2], 1);
      const uint32_t got1 = __shfl_xor_sync(0xffffffffu, odd ? r.v[1] : r.v[3], 1);
      word[2 * m][0] = odd ? got0 : own0;  // j = 2m: the even lane's block
      word[2 * m][1] = odd ? got1 : own1;
      word[2 * m + 1][0] = odd ? own0 : got0;  // j = 2m + 1: the odd lane's block
      word[2 * m + 1][1] = odd ? own1 : got1;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // ascending columns: equal scores keep the first (torch.argmax's rule)
      const int64_t col = col_base + j * 8 + 2 * q;
      const float g0 = acc[2 * j] + gumbel_noise(word[j][0]);
      const float g1 = acc[2 * j + 1] + gumbel_noise(word[j][1]);
      if (col < k.vocab && g0 > st.gumbel_value) {
        st.gumbel_value = g0;
        st.gumbel_index = static_cast<int>(col);
      }
      if (col + 1 < k.vocab && g1 > st.gumbel_value) {
        st.gumbel_value = g1;
        st.gumbel_index = static_cast<int>(col + 1);
      }
    }
  }
  // A chunk of NaN logits has no maximum (fmaxf skips NaN) but NaN sums: merged, they make the row's entropy NaN.
  if (local_max != kNegSentinel || isnan(s)) merge_sums(st, local_max, s, t);
}

__device__ __forceinline__ StatsPartial stats_partial(const RowState& st) {
  return StatsPartial{st.m, st.s, st.t, st.argmax_value, st.argmax_index, st.gumbel_value, st.gumbel_index, 0};
}

// A quad's four partial states of one row merged (every lane gets the merged state).
__device__ __forceinline__ RowState quad_merged(RowState st) {
  merge_state(st, shfl_xor_state(st, 1));
  merge_state(st, shfl_xor_state(st, 2));
  return st;
}

}  // namespace dgemma::kernels::vocab_head
