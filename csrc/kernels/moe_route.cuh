// MoE router: for each token (a row of the residual stream x),
//   h      = bf16(bf16(bf16(x * rms(x)^-1) * scale) * hidden^-1/2)     weightless RMSNorm, then scales
//   logits = bf16(h . proj[e])                                        fp32 accumulation
//   p      = softmax(logits) in fp32; keep the top_k; renormalise; * per_expert_scale[id]
// The bf16 roundings are those of the reference (python/dgemma/ops/reference.py `route`), so the
// kernel picks the same experts except for near-ties that an ulp of a logit decides.
// NOTE: selection is a total order, so ids are always valid and distinct:
//   - equal probabilities: the lowest expert id wins (bf16 logits tie often among 128 experts);
//   - a NaN logit counts as -inf (never preferred to a number); a row whose logits are all NaN/-inf
//     is uniform, i.e. experts 0 .. top_k-1 with weight expert_scale[id] / top_k;
//   - the softmax numerator of a logit equal to the row max is exactly 1 (also when the max is ±inf,
//     where exp(max - max) would be NaN), so the sum is >= 1 and no weight is NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8_quant.cuh"
#include "kernels/moe_route_limits.h"

namespace dgemma::kernels {

// Tile of one block: kTokens tokens (each proj row read from L2 serves them all), kWarps warps splitting
// the experts. The per-token arithmetic (and so every result) is the same for every tile; the tile only
// trades L2 reads of proj (one per block) against parallelism. The default, 4 tokens x 8 warps, runs
// 64 blocks for a 256-token canvas (the first version's 8 x 8 ran 32, at 131 us per layer on an H200);
// DGEMMA_ROUTE_TILE selects another compiled tile (ops/moe.cu). 16-warp tiles spill (128 registers).

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// hidden % 8 == 0 (16-byte vectors); experts <= kRouteMaxExperts, a multiple of 32; top_k <= min(experts,
// kRouteMaxTopK). Outputs: weights [tokens, top_k] fp32, ids [tokens, top_k] int32, by descending probability.
template <int kRouteTokens, int kRouteWarps>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_stride, const __nv_bfloat16* __restrict__ scale,
                 const __nv_bfloat16* __restrict__ proj, const __nv_bfloat16* __restrict__ expert_scale,
                 int64_t tokens, int hidden, int experts, int top_k, float eps, float inv_sqrt_hidden,
                 float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ __align__(16) unsigned char route_smem[];
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(route_smem);  // [kRouteTokens][hidden]
  float* logits = reinterpret_cast<float*>(h + kRouteTokens * hidden);  // [kRouteTokens][experts]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRouteTokens;

  // 1. Normalise: warp w handles token t0 + w (rows past the end become zeros and are never written out).
  for (int t = warp; t < kRouteTokens; t += kRouteWarps) {
    __nv_bfloat16* ht = h + t * hidden;
    if (t0 + t >= tokens) {
      for (int i = lane; i < hidden; i += 32) ht[i] = __float2bfloat16_rn(0.f);
      continue;
    }
    const __nv_bfloat16* xr = x + (t0 + t) * x_stride;
    float ss = 0.f;
    for (int i = lane; i < hidden; i += 32) {
      const float v = __bfloat162float(xr[i]);
      ss = fmaf(v, v, ss);
    }
    const float inv_rms = rsqrtf(warp_sum(ss) / static_cast<float>(hidden) + eps);
    for (int i = lane; i < hidden; i += 32) {
      float v = round_bf16(__bfloat162float(xr[i]) * inv_rms);
      v = round_bf16(v * __bfloat162float(scale[i]));
      ht[i] = __float2bfloat16_rn(v * inv_sqrt_hidden);
    }
  }
  __syncthreads();

  // 2. Logits: warp w takes experts w, w + 8, ...; each lane a strided set of 8-element vectors.
  const int vecs = hidden / 8;
  for (int e = warp; e < experts; e += kRouteWarps) {
    const __nv_bfloat16* pr = proj + static_cast<int64_t>(e) * hidden;
    float acc[kRouteTokens];
#pragma unroll
    for (int t = 0; t < kRouteTokens; ++t) acc[t] = 0.f;
    for (int v = lane; v < vecs; v += 32) {
      float w[8];
      load_bf16x8(pr + 8 * v, w);
#pragma unroll
      for (int t = 0; t < kRouteTokens; ++t) {
        float a[8];
        load_bf16x8(h + t * hidden + 8 * v, a);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[t] = fmaf(a[i], w[i], acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kRouteTokens; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) logits[t * experts + e] = round_bf16(s);
    }
  }
  __syncthreads();

  // 3. Softmax, top-k, renormalise: warp w handles token t0 + w.
  constexpr int kPerLane = kRouteMaxExperts / 32;
  for (int t = warp; t < kRouteTokens; t += kRouteWarps) {
    if (t0 + t >= tokens) continue;
    const int per_lane = experts / 32;
    float p[kPerLane];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float l = j < per_lane ? logits[t * experts + j * 32 + lane] : -INFINITY;
      p[j] = isnan(l) ? -INFINITY : l;
      m = fmaxf(m, p[j]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      p[j] = j < per_lane ? (p[j] == m ? 1.f : expf(p[j] - m)) : 0.f;
      sum += p[j];
    }
    const float inv_sum = 1.f / warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p[j] = j < per_lane ? p[j] * inv_sum : -1.f;  // -1: never selected
    // Every candidate now holds a probability in [0, 1] (no NaN), above the -2 a search starts from and
    // the -1 of a taken or padding slot: each of the top_k <= experts searches ends on a valid id.

    float chosen_p = 0.f, total = 0.f;
    int chosen_id = 0;
    for (int k = 0; k < top_k; ++k) {
      // Lane-local best (lowest expert id on ties), then a warp argmax with the same tie rule.
      float best = -2.f;
      int best_id = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (p[j] > best) {
          best = p[j];
          best_id = j * 32 + lane;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_id, o);
        if (ob > best || (ob == best && oi < best_id)) {
          best = ob;
          best_id = oi;
        }
      }
      total += best;
      if (lane == k) {
        chosen_p = best;
        chosen_id = best_id;
      }
      if ((best_id & 31) == lane) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j)
          if (j == (best_id >> 5)) p[j] = -1.f;
      }
    }
    if (lane < top_k) {
      const int64_t o = (t0 + t) * top_k + lane;
      weights[o] = chosen_p / total * __bfloat162float(expert_scale[chosen_id]);
      ids[o] = chosen_id;
    }
  }
}

struct RouteTile {
  int tokens, warps;
};

// The tiles compiled in, by name "<tokens>x<warps>"; the first is the default.
constexpr RouteTile kRouteTiles[] = {{4, 8}, {8, 8}, {2, 8}, {1, 8}};

template <int T, int W>
cudaError_t launch_route(const __nv_bfloat16* x, int64_t x_stride, const __nv_bfloat16* scale,
                         const __nv_bfloat16* proj, const __nv_bfloat16* expert_scale, int64_t tokens, int hidden,
                         int experts, int top_k, float eps, float inv_sqrt_hidden, float* weights, int32_t* ids,
                         cudaStream_t stream) {
  const size_t smem = route_smem_bytes(hidden, experts, T);
  cudaError_t err = cudaFuncSetAttribute(route_kernel<T, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = (tokens + T - 1) / T;
  route_kernel<T, W><<<static_cast<unsigned>(blocks), W * 32, smem, stream>>>(
      x, x_stride, scale, proj, expert_scale, tokens, hidden, experts, top_k, eps, inv_sqrt_hidden, weights, ids);
  return cudaGetLastError();
}

// `tile` indexes kRouteTiles (out of range: the default).
inline cudaError_t route(const __nv_bfloat16* x, int64_t x_stride, const __nv_bfloat16* scale,
                         const __nv_bfloat16* proj, const __nv_bfloat16* expert_scale, int64_t tokens, int hidden,
                         int experts, int top_k, float eps, float inv_sqrt_hidden, float* weights, int32_t* ids,
                         cudaStream_t stream, int tile = 0) {
  if (tokens == 0) return cudaSuccess;
#define DGEMMA_ROUTE_ARGS \
  x, x_stride, scale, proj, expert_scale, tokens, hidden, experts, top_k, eps, inv_sqrt_hidden, weights, ids, stream
  switch (tile) {
    case 1: return launch_route<8, 8>(DGEMMA_ROUTE_ARGS);
    case 2: return launch_route<2, 8>(DGEMMA_ROUTE_ARGS);
    case 3: return launch_route<1, 8>(DGEMMA_ROUTE_ARGS);
    default: return launch_route<4, 8>(DGEMMA_ROUTE_ARGS);
  }
#undef DGEMMA_ROUTE_ARGS
}

}  // namespace dgemma::kernels
