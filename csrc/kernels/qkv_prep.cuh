// Fused attention input preparation: per-head weighted RMSNorm + rotate-half RoPE of q and k,
// weightless RMSNorm of v, and (optionally) the write of k/v into the KV cache, reading each
// projection row once. With k_eq_v (full layers: no v_proj) one read of a k_proj row yields both
// K = rope(k_norm(x)) and V = v_norm(x).
//
// Rounding follows the reference ops exactly: the norm is computed in fp32 and rounded once to bf16;
// RoPE is bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), as three bf16 tensor ops would round.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pdl.cuh"

namespace dgemma::kernels {

struct QkvPrepParams {
  const __nv_bfloat16* q_in;  // [B, T, Hq * D]
  const __nv_bfloat16* k_in;  // [B, T, Hkv * D]
  const __nv_bfloat16* v_in;  // [B, T, Hkv * D], or null: V = v_norm(k_in) (k_eq_v)
  int64_t q_in_sb, q_in_st, k_in_sb, k_in_st, v_in_sb, v_in_st;
  const __nv_bfloat16* q_weight;  // [D]
  const __nv_bfloat16* k_weight;  // [D]
  const __nv_bfloat16* cos;       // [B or 1, T, D]
  const __nv_bfloat16* sin;
  int64_t cs_sb, cs_st;  // shared by cos and sin (cs_sb 0: one table for the batch)
  __nv_bfloat16* q_out;  // [B, T, Hq, D] contiguous
  __nv_bfloat16* k_out;  // [B, T, Hkv, D] contiguous
  __nv_bfloat16* v_out;
  __nv_bfloat16* cache_k;  // [B, Hkv, slots, D], or null: no cache write
  __nv_bfloat16* cache_v;
  int64_t ck_sb, ck_sh, ck_ss, cv_sb, cv_sh, cv_ss;
  int cache_start;  // position of token 0
  int ring_size;    // 0: position p at slot p; else slot p % ring_size, only the last ring_size tokens
  int batch, t, hq, hkv;
  float eps;
};

namespace qkv_prep_detail {

constexpr int kWarps = 8;

// A lane holds D/256 chunks of 8 elements, chunk c at d = c * 256 + lane * 8.
template <int D>
struct Row {
  static constexpr int kChunks = D / 256;
  float x[kChunks][8];
};

template <int D>
__device__ __forceinline__ void load_row(const __nv_bfloat16* src, int lane, Row<D>& r) {
#pragma unroll
  for (int c = 0; c < Row<D>::kChunks; ++c) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src + c * 256 + lane * 8);
    const __nv_bfloat162* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(v[j]);
      r.x[c][2 * j] = f.x;
      r.x[c][2 * j + 1] = f.y;
    }
  }
}

template <int D>
__device__ __forceinline__ void store_row(__nv_bfloat16* dst, int lane, const Row<D>& r) {
#pragma unroll
  for (int c = 0; c < Row<D>::kChunks; ++c) {
    uint4 raw;
    __nv_bfloat162* v = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = __floats2bfloat162_rn(r.x[c][2 * j], r.x[c][2 * j + 1]);
    *reinterpret_cast<uint4*>(dst + c * 256 + lane * 8) = raw;
  }
}

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// y = bf16(x * rsqrt(mean(x^2) + eps) [* w]) (values kept as floats holding bf16 numbers).
template <int D>
__device__ __forceinline__ void rms_norm_row(const Row<D>& x, const __nv_bfloat16* w, int lane, float eps,
                                             Row<D>& y) {
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < Row<D>::kChunks; ++c)
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += x.x[c][j] * x.x[c][j];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float scale = rsqrtf(ss / D + eps);
#pragma unroll
  for (int c = 0; c < Row<D>::kChunks; ++c) {
    float wf[8];
    if (w != nullptr) {
      Row<256> wr;
      load_row<256>(w + c * 256, lane, wr);
#pragma unroll
      for (int j = 0; j < 8; ++j) wf[j] = wr.x[0][j];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) wf[j] = 1.f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) y.x[c][j] = round_bf16(x.x[c][j] * scale * wf[j]);
  }
}

// Rotate-half RoPE in place: x[d] = bf16(bf16(x[d] cos[d]) + bf16(r[d] sin[d])), r = (-x[D/2:], x[:D/2]).
template <int D>
__device__ __forceinline__ void rope_row(Row<D>& x, const __nv_bfloat16* cos, const __nv_bfloat16* sin, int lane) {
  Row<D> c, s, partner;
  load_row<D>(cos, lane, c);
  load_row<D>(sin, lane, s);
  bool first_half[Row<D>::kChunks];
#pragma unroll
  for (int ch = 0; ch < Row<D>::kChunks; ++ch) {
    if constexpr (D == 256) {
      // d = lane * 8: lanes 0-15 hold the first half, whose partner is 16 lanes away.
#pragma unroll
      for (int j = 0; j < 8; ++j) partner.x[ch][j] = __shfl_xor_sync(0xffffffffu, x.x[ch][j], 16);
      first_half[ch] = lane < 16;
    } else {
      static_assert(D == 512, "qkv_prep supports head_dim 256 and 512");
      // chunk 0 (d < 256) pairs with chunk 1 (d + 256) of the same lane.
#pragma unroll
      for (int j = 0; j < 8; ++j) partner.x[ch][j] = x.x[ch ^ 1][j];
      first_half[ch] = ch == 0;
    }
  }
#pragma unroll
  for (int ch = 0; ch < Row<D>::kChunks; ++ch)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float r = first_half[ch] ? -partner.x[ch][j] : partner.x[ch][j];
      x.x[ch][j] = round_bf16(round_bf16(x.x[ch][j] * c.x[ch][j]) + round_bf16(r * s.x[ch][j]));
    }
}

template <int D>
__device__ __forceinline__ void write_cache(const QkvPrepParams& p, __nv_bfloat16* cache, int64_t sb, int64_t sh,
                                            int64_t ss, int b, int t, int h, int lane, const Row<D>& r) {
  if (cache == nullptr) return;
  if (p.ring_size > 0 && t < p.t - p.ring_size) return;  // overwritten by a later token of this call
  const int64_t pos = int64_t(p.cache_start) + t;
  const int64_t slot = p.ring_size > 0 ? pos % p.ring_size : pos;
  store_row<D>(cache + b * sb + h * sh + slot * ss, lane, r);
}

// One warp per (token, head) row: q rows first, then k rows (with v when k_eq_v), then v rows.
template <int D>
__global__ void __launch_bounds__(kWarps * 32) qkv_prep_kernel(const QkvPrepParams p) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t tokens = int64_t(p.batch) * p.t;
  const int64_t nq = tokens * p.hq, nk = tokens * p.hkv;
  const int64_t total = nq + nk + (p.v_in != nullptr ? nk : 0);
  const int64_t w = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (w >= total) return;
  Row<D> x, y;
  if (w < nq) {
    const int h = static_cast<int>(w % p.hq);
    const int64_t tok = w / p.hq;
    const int b = static_cast<int>(tok / p.t), t = static_cast<int>(tok % p.t);
    load_row<D>(p.q_in + b * p.q_in_sb + t * p.q_in_st + int64_t(h) * D, lane, x);
    rms_norm_row<D>(x, p.q_weight, lane, p.eps, y);
    rope_row<D>(y, p.cos + b * p.cs_sb + t * p.cs_st, p.sin + b * p.cs_sb + t * p.cs_st, lane);
    store_row<D>(p.q_out + w * D, lane, y);
    return;
  }
  const bool is_k = w < nq + nk;
  const int64_t kw = is_k ? w - nq : w - nq - nk;
  const int h = static_cast<int>(kw % p.hkv);
  const int64_t tok = kw / p.hkv;
  const int b = static_cast<int>(tok / p.t), t = static_cast<int>(tok % p.t);
  if (is_k) {
    load_row<D>(p.k_in + b * p.k_in_sb + t * p.k_in_st + int64_t(h) * D, lane, x);
    rms_norm_row<D>(x, p.k_weight, lane, p.eps, y);
    rope_row<D>(y, p.cos + b * p.cs_sb + t * p.cs_st, p.sin + b * p.cs_sb + t * p.cs_st, lane);
    store_row<D>(p.k_out + kw * D, lane, y);
    write_cache<D>(p, p.cache_k, p.ck_sb, p.ck_sh, p.ck_ss, b, t, h, lane, y);
    if (p.v_in != nullptr) return;
  } else {
    load_row<D>(p.v_in + b * p.v_in_sb + t * p.v_in_st + int64_t(h) * D, lane, x);
  }
  rms_norm_row<D>(x, nullptr, lane, p.eps, y);
  store_row<D>(p.v_out + kw * D, lane, y);
  write_cache<D>(p, p.cache_v, p.cv_sb, p.cv_sh, p.cv_ss, b, t, h, lane, y);
}

}  // namespace qkv_prep_detail

template <int D>
cudaError_t qkv_prep_bf16(const QkvPrepParams& p, cudaStream_t stream) {
  const int64_t tokens = int64_t(p.batch) * p.t;
  const int64_t rows = tokens * (p.hq + p.hkv * (p.v_in != nullptr ? 2 : 1));
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + qkv_prep_detail::kWarps - 1) / qkv_prep_detail::kWarps;
  return launch_kernel(qkv_prep_detail::qkv_prep_kernel<D>, static_cast<unsigned>(blocks),
                       qkv_prep_detail::kWarps * 32, 0, stream, p);
}

}  // namespace dgemma::kernels
