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
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8_quant.cuh"
#include "kernels/moe_route_limits.h"
#include "kernels/pdl.cuh"
#include "kernels/residual_norm.cuh"
#include "kernels/warp_mma_sm80.cuh"

namespace dgemma::kernels {

namespace cg = cooperative_groups;

// route_kernel (CUDA cores): kTokens tokens per block (each proj row read from L2 serves them all), kWarps warps
// splitting the experts. The per-token arithmetic (and so every result) is the same for every tile; the tile only
// trades L2 reads of proj (one per block) against parallelism (8 x 8 ran 131 us per layer at 256 tokens on an
// H200). The default is the tensor-core kernel below; DGEMMA_ROUTE_TILE selects another variant (ops/moe.cu).
// 16-warp tiles spill (128 registers).

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The router's input as a residual update it also stores (the layer's attention residual, fused): the row of token
// t is out[t] = bf16(x[t] + bf16(rms_norm(y[t]) * w)) (residual_norm.cuh's add form, the same roundings, eps the
// router's), and the router reads that row. x, y and out: contiguous rows of `hidden`. y null: x as it is.
struct RouteResidual {
  const __nv_bfloat16* y = nullptr;
  const __nv_bfloat16* w = nullptr;
  __nv_bfloat16* out = nullptr;
};

// One router call: x [tokens, hidden] (rows x_stride apart), scale [hidden], proj [experts, hidden], expert_scale
// [experts]; outputs weights and ids [tokens, top_k]; res: the fused residual (see RouteResidual).
struct RouteParams {
  const __nv_bfloat16* x;
  int64_t x_stride;
  const __nv_bfloat16* scale;
  const __nv_bfloat16* proj;
  const __nv_bfloat16* expert_scale;
  int64_t tokens;
  int hidden, experts, top_k;
  float eps, inv_sqrt_hidden;
  float* weights;
  int32_t* ids;
  RouteResidual res;
};

// h[i] of an element x (a bf16 value) of a row with 1 / rms inv_rms, before its rounding to bf16:
// bf16(bf16(x * inv_rms) * scale) * hidden^-1/2.
__device__ __forceinline__ float route_input_of(float x, float inv_rms, float scale, float inv_sqrt_hidden) {
  return round_bf16(round_bf16(x * inv_rms) * scale) * inv_sqrt_hidden;
}

// R tokens' router inputs, by one warp: h[i] = bf16(bf16(bf16(x[i] * rms^-1) * scale[i]) * hidden^-1/2) of row r
// (xr[r]; null: a padding row of zeros), written to slot(r, i) (a bf16 in shared memory, a reference). With res.y,
// x is the residual update of row token[r] (stored to res.out unless that is null).
// The rows go together, their loads in flight at once (one row at a time leaves a warp waiting on one load after
// another); each row's arithmetic and order are its own, so every value is the same whatever R. Each pass leaves
// its row in the slots (y, then x): the next pass reads it there rather than from global memory, so only the
// first touch of a row waits on L2 (two global passes with res.y, one without). A slot is only ever read and
// written by the lane that visits its element, so no synchronisation is needed between the passes.
template <int R, int kBatch = kRowBatchOf<__nv_bfloat16>, typename Slot>
__device__ __forceinline__ void route_normalize_rows(const __nv_bfloat16* const (&xr)[R],
                                                     const __nv_bfloat16* __restrict__ scale, int hidden, float eps,
                                                     float inv_sqrt_hidden, int lane, Slot&& slot,
                                                     const RouteResidual& res, const int64_t (&token)[R]) {
  const bool fused = res.y != nullptr;
  const __nv_bfloat16* yr[R];
  float ry[R], inv_rms[R];
#pragma unroll
  for (int r = 0; r < R; ++r) yr[r] = fused && xr[r] != nullptr ? res.y + token[r] * hidden : nullptr;
  // One pass: each element's value(r, i) (a bf16 value, so its slot holds it exactly) to its slot and to also(r, i, v);
  // then inv[r] = 1 / rms of the row, its squares summed in for_rows_elements' order (row_inv_rms's, bit for bit).
  auto stage_pass = [&](auto&& value, auto&& also, float (&inv)[R]) {
    float sum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sum[r] = 0.f;
    for_rows_elements<R, kBatch>(hidden, lane, value, [&](int r, int i, float v) {
      also(r, i, v);
      slot(r, i) = __float2bfloat16_rn(v);
      sum[r] = fmaf(v, v, sum[r]);
    });
#pragma unroll
    for (int r = 0; r < R; ++r) inv[r] = rsqrtf(warp_sum(sum[r]) / static_cast<float>(hidden) + eps);
  };
  if (fused)  // y to the slots and its inverse rms (the add form's)
    stage_pass([&](int r, int i) { return yr[r] != nullptr ? __bfloat162float(yr[r][i]) : 0.f; },
               [](int, int, float) {}, ry);
  // x (or the residual update x + norm(y)·w, y from the slots, rounded as the add form rounds it) to the slots.
  stage_pass(
      [&](int r, int i) {
        if (xr[r] == nullptr) return 0.f;
        const float x = __bfloat162float(xr[r][i]);
        if (yr[r] == nullptr) return x;
        return add_norm_of<__nv_bfloat16>(x, __bfloat162float(slot(r, i)), __bfloat162float(res.w[i]), ry[r]);
      },
      [&](int r, int i, float v) {
        if (yr[r] != nullptr && res.out != nullptr) res.out[token[r] * hidden + i] = __float2bfloat16_rn(v);
      },
      inv_rms);
  for_rows_elements<R, kBatch>(
      hidden, lane,
      [&](int r, int i) {
        return xr[r] == nullptr ? 0.f
                                : route_input_of(__bfloat162float(slot(r, i)), inv_rms[r], __bfloat162float(scale[i]),
                                                 inv_sqrt_hidden);
      },
      [&](int r, int i, float v) { slot(r, i) = __float2bfloat16_rn(v); });
}

// Chunks of 8 elements a lane moves between global memory and the slots at once (route_normalize_rows_vec): a row of
// the model's 2816 is 352 chunks, 11 per lane, so one batch holds a lane's whole row.
constexpr int kRouteVecBatch = 12;

// route_normalize_rows with 16-byte accesses, the same values: what a pass computes per element is elementwise, and
// the two sums (of y's squares, of x's) run over the rows staged in the slots in for_rows_elements' order. What
// changes is the traffic: lane l moves a row's 8-element chunks l, l + 32, ... between global memory and the slots,
// all of a row's loads in flight at once, so each row costs one round trip to L2 per global pass rather than one per
// batch of a lane's elements. Needs 16-byte aligned rows (x, res.y, res.out), scale and res.w, and slots whose
// slot(r, i) for i % 8 == 0 starts 8 consecutive bf16 (16-byte aligned). The warp's lanes exchange rows through the
// slots, so the passes are separated by __syncwarp().
template <int R, typename Slot>
__device__ __forceinline__ void route_normalize_rows_vec(const __nv_bfloat16* const (&xr)[R],
                                                         const __nv_bfloat16* __restrict__ scale, int hidden, float eps,
                                                         float inv_sqrt_hidden, int lane, Slot&& slot,
                                                         const RouteResidual& res, const int64_t (&token)[R]) {
  const int chunks = hidden / 8;
  const bool fused = res.y != nullptr;
  auto chunk_at = [&](int r, int c) -> uint4& { return *reinterpret_cast<uint4*>(&slot(r, 8 * c)); };
  // 1 / rms of each row as the slots hold it, its squares summed in for_rows_elements' order (the scalar path's). The
  // lanes read each other's chunks: every chunk is in before, and every lane has read what it sums after.
  auto slots_inv_rms = [&](float (&inv)[R]) {
    __syncwarp();
    float sum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sum[r] = 0.f;
    for_rows_elements<R, kRowBatchOf<__nv_bfloat16>>(
        hidden, lane, [&](int r, int i) { return __bfloat162float(slot(r, i)); },
        [&](int r, int, float v) { sum[r] = fmaf(v, v, sum[r]); });
#pragma unroll
    for (int r = 0; r < R; ++r) inv[r] = rsqrtf(warp_sum(sum[r]) / static_cast<float>(hidden) + eps);
    __syncwarp();
  };
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // A lane's batch of chunks c0, c0 + 32, ... of `row` (zeros past the row's end or for a null row), all in flight.
  auto load_chunks = [&](const __nv_bfloat16* row, int c0, uint4 (&raw)[kRouteVecBatch]) {
#pragma unroll
    for (int j = 0; j < kRouteVecBatch; ++j) {
      const int c = c0 + 32 * j;
      raw[j] = c < chunks && row != nullptr ? *reinterpret_cast<const uint4*>(row + 8 * c) : zero;
    }
  };
  const __nv_bfloat16* yr[R];
  float ry[R], inv_rms[R];
#pragma unroll
  for (int r = 0; r < R; ++r) yr[r] = fused && xr[r] != nullptr ? res.y + token[r] * hidden : nullptr;
  if (fused) {
    // y to the slots, then the sum of its squares over them in the add form's order.
#pragma unroll
    for (int r = 0; r < R; ++r)
      for (int c0 = lane; c0 < chunks; c0 += 32 * kRouteVecBatch) {
        uint4 raw[kRouteVecBatch];
        load_chunks(yr[r], c0, raw);
#pragma unroll
        for (int j = 0; j < kRouteVecBatch; ++j)
          if (c0 + 32 * j < chunks) chunk_at(r, c0 + 32 * j) = raw[j];
      }
    slots_inv_rms(ry);
  }
  // x (or the residual update x + norm(y)·w, y from the slots) to the slots and, fused, to res.out.
#pragma unroll
  for (int r = 0; r < R; ++r)
    for (int c0 = lane; c0 < chunks; c0 += 32 * kRouteVecBatch) {
      uint4 xraw[kRouteVecBatch], wraw[kRouteVecBatch];
      load_chunks(xr[r], c0, xraw);
      load_chunks(yr[r] != nullptr ? res.w : nullptr, c0, wraw);
#pragma unroll
      for (int j = 0; j < kRouteVecBatch; ++j) {
        const int c = c0 + 32 * j;
        if (c >= chunks) continue;
        if (yr[r] == nullptr) {  // x as it is (zeros for a padding row)
          chunk_at(r, c) = xraw[j];
          continue;
        }
        float xv[8], yv[8], wv[8], v[8];
        unpack_bf16x8(xraw[j], xv);
        unpack_bf16x8(chunk_at(r, c), yv);
        unpack_bf16x8(wraw[j], wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = add_norm_of<__nv_bfloat16>(xv[e], yv[e], wv[e], ry[r]);
        const uint4 packed = pack_bf16x8(v);  // bf16 values: exact
        if (res.out != nullptr) *reinterpret_cast<uint4*>(res.out + token[r] * hidden + 8 * c) = packed;
        chunk_at(r, c) = packed;
      }
    }
  slots_inv_rms(inv_rms);
#pragma unroll
  for (int r = 0; r < R; ++r)
    for (int c0 = lane; c0 < chunks; c0 += 32 * kRouteVecBatch) {
      uint4 sraw[kRouteVecBatch];
      load_chunks(xr[r] != nullptr ? scale : nullptr, c0, sraw);
#pragma unroll
      for (int j = 0; j < kRouteVecBatch; ++j) {
        const int c = c0 + 32 * j;
        if (c >= chunks) continue;
        if (xr[r] == nullptr) {
          chunk_at(r, c) = zero;
          continue;
        }
        float xv[8], sv[8], h[8];
        unpack_bf16x8(chunk_at(r, c), xv);
        unpack_bf16x8(sraw[j], sv);
#pragma unroll
        for (int e = 0; e < 8; ++e) h[e] = route_input_of(xv[e], inv_rms[r], sv[e], inv_sqrt_hidden);
        chunk_at(r, c) = pack_bf16x8(h);  // rounded to bf16 as the scalar path's store rounds it
      }
    }
}

// Whether route_normalize_rows_vec may read and write these rows: 16-byte aligned rows, scale and residual weight.
__device__ __forceinline__ bool route_rows_vectorisable(const RouteParams& p) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  return p.hidden % 8 == 0 && p.x_stride % 8 == 0 && aligned(p.x) && aligned(p.scale) &&
         (p.res.y == nullptr || (aligned(p.res.y) && aligned(p.res.w) && (p.res.out == nullptr || aligned(p.res.out))));
}

// One token's softmax over its (bf16-rounded) logits, top-k and renormalisation, by one warp (the tie and NaN
// rules above). Writes weights[0..top_k) and ids[0..top_k), by descending probability.
__device__ __forceinline__ void route_select(const float* logits, int experts, int top_k,
                                             const __nv_bfloat16* __restrict__ expert_scale, float* weights,
                                             int32_t* ids, int lane) {
  constexpr int kPerLane = kRouteMaxExperts / 32;
  const int per_lane = experts / 32;
  float p[kPerLane];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float l = j < per_lane ? logits[j * 32 + lane] : -INFINITY;
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
    // Take it out (a select per slot: the slots stay in registers).
    const bool mine = (best_id & 31) == lane;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p[j] = mine && j == (best_id >> 5) ? -1.f : p[j];
  }
  if (lane < top_k) {
    weights[lane] = chosen_p / total * __bfloat162float(expert_scale[chosen_id]);
    ids[lane] = chosen_id;
  }
}

// hidden % 8 == 0 (16-byte vectors); experts <= kRouteMaxExperts, a multiple of 32; top_k <= min(experts,
// kRouteMaxTopK). Outputs: weights [tokens, top_k] fp32, ids [tokens, top_k] int32, by descending probability.
template <int kRouteTokens, int kRouteWarps>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_kernel(const RouteParams p) {
  pdl_begin();
  extern __shared__ __align__(16) unsigned char route_smem[];
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(route_smem);  // [kRouteTokens][hidden]
  float* logits = reinterpret_cast<float*>(h + kRouteTokens * p.hidden);  // [kRouteTokens][experts]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRouteTokens;

  // 1. Normalise: warp w handles token t0 + w (rows past the end become zeros and are never written out).
  for (int t = warp; t < kRouteTokens; t += kRouteWarps) {
    __nv_bfloat16* ht = h + t * p.hidden;
    const __nv_bfloat16* xr[1] = {t0 + t < p.tokens ? p.x + (t0 + t) * p.x_stride : nullptr};
    const int64_t token[1] = {t0 + t};
    // NOTE: the scalar passes: the 16-byte ones (route_normalize_rows_vec) make ptxas spill in these variants.
    route_normalize_rows<1, kRowBatch>(xr, p.scale, p.hidden, p.eps, p.inv_sqrt_hidden, lane,
                                       [&](int, int i) -> __nv_bfloat16& { return ht[i]; }, p.res, token);
  }
  __syncthreads();

  // 2. Logits: warp w takes experts w, w + 8, ...; each lane a strided set of 8-element vectors.
  const int vecs = p.hidden / 8;
  for (int e = warp; e < p.experts; e += kRouteWarps) {
    const __nv_bfloat16* pr = p.proj + static_cast<int64_t>(e) * p.hidden;
    float acc[kRouteTokens];
#pragma unroll
    for (int t = 0; t < kRouteTokens; ++t) acc[t] = 0.f;
    for (int v = lane; v < vecs; v += 32) {
      float w[8];
      load_bf16x8(pr + 8 * v, w);
#pragma unroll
      for (int t = 0; t < kRouteTokens; ++t) {
        float a[8];
        load_bf16x8(h + t * p.hidden + 8 * v, a);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[t] = fmaf(a[i], w[i], acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kRouteTokens; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) logits[t * p.experts + e] = round_bf16(s);
    }
  }
  __syncthreads();

  // 3. Softmax, top-k, renormalise: warp w handles token t0 + w.
  for (int t = warp; t < kRouteTokens; t += kRouteWarps) {
    if (t0 + t >= p.tokens) continue;
    route_select(logits + t * p.experts, p.experts, p.top_k, p.expert_scale, p.weights + (t0 + t) * p.top_k,
                 p.ids + (t0 + t) * p.top_k, lane);
  }
}

// Tensor-core router: 16 tokens per block (one mma row block), 4 warps splitting the experts; the logits by
// mma.sync m16n8k16 (bf16 in, fp32 accumulation) over 64-wide K tiles of proj streamed through a cp.async pipeline
// whose first tiles are requested before the normalisation (they do not depend on it, so the two overlap: with a
// cluster, kRouteTcDeepStages cover a block's whole K chunk), the normalised rows resident in shared memory.
// Normalisation and selection are route_kernel's; the fp32 sum of a logit runs in the tensor cores' order, so it may
// differ from route_kernel's by an ulp before the bf16 rounding (the routes agree but for such near-ties).
// A logit's fp32 sum runs over kRouteTcChunks fixed K chunks (chunk c: K tiles [c·n/8, (c+1)·n/8)), each summed from
// zero, then the chunks in order: the same order whatever the launch shape, so a token routes the same alone or in
// any batch. Few tokens leave most SMs idle (256 tokens: 16 blocks, each streaming all of proj), so then a block's
// chunks are spread over a thread-block cluster of 8 blocks (launch_route_tc), one chunk each: every block's fp32
// chunk partials stay in its shared memory; rank r adds those of tokens 2r and 2r + 1 in chunk order over distributed
// shared memory, rounds and selects them (the 8 ranks at once: rank 0 alone summing and selecting all 16 tokens made
// the clustered launch slower than one block streaming every chunk, 211 vs 145 us on an H200 at c4fb56a), and rank 0
// alone stores the fused residual rows.
constexpr int kRouteTcTokens = 16;
constexpr int kRouteTcWarps = 4;
constexpr int kRouteTcK = 64;
constexpr int kRouteTcStages = 3;      // the pipeline where the deep one does not fit the shared memory
constexpr int kRouteTcDeepStages = 6;  // >= a cluster block's K tiles at hidden 2816 (44 tiles / 8 chunks: 5 or 6)
constexpr int kRouteTcChunks = 8;  // the fixed K chunks of a logit's sum; also the cluster size when clustered

// First K tile of chunk c of n tiles (c = kRouteTcChunks: n).
__host__ __device__ __forceinline__ int route_tc_chunk_begin(int c, int n) { return c * n / kRouteTcChunks; }

constexpr size_t route_tc_smem_bytes(int hidden, int experts, int stages = kRouteTcStages) {
  return static_cast<size_t>(kRouteTcTokens) * hidden * 2 +
         static_cast<size_t>(stages) * experts * kRouteTcK * 2 + static_cast<size_t>(kRouteTcTokens) * experts * 4;
}

// Sizes the tensor-core router takes (others run route_kernel).
inline bool route_tc_fits(int hidden, int experts) {
  return hidden % kRouteTcK == 0 && (experts == 64 || experts == 128 || experts == 256) &&
         route_tc_smem_bytes(hidden, experts) <= kRouteMaxSmemBytes;
}

// The pipeline depth a launch takes: the deep one where it fits the shared memory.
inline int route_tc_stages(int hidden, int experts) {
  return route_tc_smem_bytes(hidden, experts, kRouteTcDeepStages) <= kRouteMaxSmemBytes ? kRouteTcDeepStages
                                                                                        : kRouteTcStages;
}

// Element offset of (row, 16-byte chunk) in rows of `row_chunks` chunks (a multiple of 8), the chunk's low 3 bits
// XORed with row % 8: the 8 rows an ldmatrix reads at one column land in 8 different bank groups.
__device__ __forceinline__ int route_swizzle(int row, int chunk, int row_chunks) {
  return (row * row_chunks + (chunk ^ (row & 7))) * 8;
}

// kVec consecutive floats at `local`'s shared-memory offset in each block of the cluster (v[r]: rank r's), over
// distributed shared memory, every load issued before any is used: one round trip, not one per rank.
// NOTE: mapa + ld.shared::cluster on 32-bit shared addresses; the generic pointers of cg's map_shared_rank made the
// compiler spill here.
template <int kVec>
__device__ __forceinline__ void load_cluster_ranks(const float* local, float (&v)[kRouteTcChunks][kVec]) {
  static_assert(kVec == 1 || kVec == 2 || kVec == 4, "1, 2 or 4 floats per rank");
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t remote[kRouteTcChunks];
#pragma unroll
  for (int r = 0; r < kRouteTcChunks; ++r)
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote[r]) : "r"(addr), "r"(r));
#pragma unroll
  for (int r = 0; r < kRouteTcChunks; ++r) {
    if constexpr (kVec == 1) {
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v[r][0]) : "r"(remote[r]) : "memory");
    } else if constexpr (kVec == 2) {
      asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v[r][0]), "=f"(v[r][1]) : "r"(remote[r])
                   : "memory");
    } else {
      asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                   : "=f"(v[r][0]), "=f"(v[r][1]), "=f"(v[r][2]), "=f"(v[r][3])
                   : "r"(remote[r])
                   : "memory");
    }
  }
}

// kNTiles: n8 tiles per warp = experts / 32; kStages: the cp.async pipeline's depth.
template <int kNTiles, int kStages>
__global__ void __launch_bounds__(kRouteTcWarps * 32)
    route_tc_kernel(const RouteParams p) {
  pdl_begin();
  static_assert(kNTiles % 2 == 0, "n-tiles are loaded in pairs");
  constexpr int kExperts = kNTiles * 8 * kRouteTcWarps;
  extern __shared__ __align__(128) unsigned char route_tc_smem[];
  __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(route_tc_smem);  // [16][hidden], swizzled
  __nv_bfloat16* tiles = h + kRouteTcTokens * p.hidden;                 // [stages][experts][64], swizzled
  float* logits = reinterpret_cast<float*>(tiles + kStages * kExperts * kRouteTcK);  // [16][experts]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRouteTcTokens;
  const int row_chunks = p.hidden / 8;
  // This block's K tiles: all of them, or with a cluster of kRouteTcChunks blocks (gridDim.y) chunk blockIdx.y.
  const bool clustered = gridDim.y > 1;
  const int rank = static_cast<int>(blockIdx.y);
  const int all_tiles = p.hidden / kRouteTcK;
  const int kt_begin = clustered ? route_tc_chunk_begin(rank, all_tiles) : 0;
  const int kt_end = clustered ? route_tc_chunk_begin(rank + 1, all_tiles) : all_tiles;
  const RouteResidual res{p.res.y, p.res.w, rank == 0 ? p.res.out : nullptr};  // rank 0 stores the residual rows
  const int k_tiles = kt_end - kt_begin;
  auto load = [&](int i) {  // the block's i-th K tile
    __nv_bfloat16* dst = tiles + (i % kStages) * kExperts * kRouteTcK;
    const __nv_bfloat16* src = p.proj + static_cast<int64_t>(kt_begin + i) * kRouteTcK;
    for (int c = threadIdx.x; c < kExperts * 8; c += kRouteTcWarps * 32) {
      const int row = c / 8, chunk = c % 8;
      cp_async_16(dst + route_swizzle(row, chunk, 8), src + static_cast<int64_t>(row) * p.hidden + chunk * 8, 16);
    }
  };
  // The pipeline's first tiles, in flight while the rows are normalised: kStages - 1 of them, or all kStages when that
  // is every tile of the block (the ring never wraps, so the stage the loop would refill first is free).
  const int ahead = k_tiles == kStages ? kStages : kStages - 1;
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    if (s >= ahead) break;
    if (s < k_tiles) load(s);
    cp_async_commit();
  }

  // 1. Normalise the block's tokens (rows past the end are zeros and are never written out): warp w takes rows w,
  // w + 4, w + 8 and w + 12, together.
  {
    constexpr int kRows = kRouteTcTokens / kRouteTcWarps;
    const __nv_bfloat16* xr[kRows];
    int64_t token[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      token[r] = t0 + warp + r * kRouteTcWarps;
      xr[r] = token[r] < p.tokens ? p.x + token[r] * p.x_stride : nullptr;
    }
    auto slot = [&](int r, int i) -> __nv_bfloat16& {
      return h[route_swizzle(warp + r * kRouteTcWarps, i / 8, row_chunks) + i % 8];
    };
    if (route_rows_vectorisable(p))
      route_normalize_rows_vec<kRows>(xr, p.scale, p.hidden, p.eps, p.inv_sqrt_hidden, lane, slot, res, token);
    else
      route_normalize_rows<kRows>(xr, p.scale, p.hidden, p.eps, p.inv_sqrt_hidden, lane, slot, res, token);
  }

  // 2. Logits of the 16 tokens against this warp's experts n0 .. n0 + 8 * kNTiles - 1.
  const int n0 = warp * kNTiles * 8;
  float acc[kNTiles][4], total[kNTiles][4];  // the current chunk's sums; the finished chunks' (unclustered)
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = total[j][e] = 0.f;
  int chunk = 0;  // unclustered: the chunk being summed
  auto fold_chunks_ending_at = [&](int end) {  // total += acc for every chunk that ends at tile `end`
    while (chunk < kRouteTcChunks && route_tc_chunk_begin(chunk + 1, all_tiles) == end) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          total[j][e] += acc[j][e];
          acc[j][e] = 0.f;
        }
      ++chunk;
    }
  };
  if (!clustered) fold_chunks_ending_at(0);  // leading empty chunks (fewer tiles than chunks)
  for (int i = 0; i < k_tiles; ++i) {
    cp_async_wait<kStages - 2>();  // `ahead` + i groups committed: tile i's is complete
    __syncthreads();  // tile i landed for every thread; the stage loaded next was consumed by all (and h is stored)
    if (i + kStages - 1 >= ahead && i + kStages - 1 < k_tiles) load(i + kStages - 1);
    cp_async_commit();
    const __nv_bfloat16* tile = tiles + (i % kStages) * kExperts * kRouteTcK;
    const int kt = kt_begin + i;
#pragma unroll
    for (int ks = 0; ks < kRouteTcK / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, h + route_swizzle(lane % 16, kt * (kRouteTcK / 8) + ks * 2 + lane / 16, row_chunks));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, tile + route_swizzle(n0 + np * 16 + lane % 8 + 8 * (lane / 16), ks * 2 + (lane / 8) % 2, 8));
        mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
        mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    if (!clustered) fold_chunks_ending_at(kt + 1);
  }
  cp_async_wait<0>();

  // 3. Logits to shared memory (accumulator layout: rows lane/4 and lane/4 + 8, two columns each): the chunk sums
  // bf16-rounded, or with a cluster each rank's chunk partial (added in chunk order and rounded below).
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int col = n0 + j * 8 + 2 * (lane % 4);
    const int row = lane / 4;
    const int at[4] = {row * kExperts + col, row * kExperts + col + 1, (row + 8) * kExperts + col,
                       (row + 8) * kExperts + col + 1};
#pragma unroll
    for (int e = 0; e < 4; ++e) logits[at[e]] = clustered ? acc[j][e] : round_bf16(total[j][e]);
  }
  // 4. Softmax, top-k, renormalise, one warp per token: the block's 16 tokens, or with a cluster this rank's share.
  const float* rounded = logits;  // [tokens][kExperts], bf16-rounded sums
  int first = 0, tokens_here = kRouteTcTokens;
  if (!clustered) {
    __syncthreads();
  } else {
    // Rank r finishes tokens [r * kRows, (r + 1) * kRows): their chunk partials added in chunk (rank) order over
    // distributed shared memory, 0 + chunk 0 first (the unclustered order exactly), rounded into the K tiles' stages
    // (free now), then selected. The 8 ranks sum and select at once, each a round trip of loads.
    constexpr int kRows = kRouteTcTokens / kRouteTcChunks;
    constexpr int kPer = kRows * kExperts / (kRouteTcWarps * 32);  // consecutive logits per thread: 1, 2 or 4
    static_assert(kRows * kRouteTcChunks == kRouteTcTokens && kPer * kRouteTcWarps * 32 == kRows * kExperts,
                  "a rank's tokens' logits split evenly over its threads");
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every rank's chunk partials are in its shared memory, and no thread reads the K tiles any more
    float* mine = reinterpret_cast<float*>(tiles);
    float part[kRouteTcChunks][kPer];
    load_cluster_ranks<kPer>(logits + rank * kRows * kExperts + threadIdx.x * kPer, part);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      float v = 0.f + part[0][e];
#pragma unroll
      for (int r = 1; r < kRouteTcChunks; ++r) v += part[r][e];
      mine[threadIdx.x * kPer + e] = round_bf16(v);
    }
    cluster.sync();  // no rank reads another's shared memory past here; this rank's sums are complete
    rounded = mine;
    first = rank * kRows;
    tokens_here = kRows;
  }
  for (int t = warp; t < tokens_here; t += kRouteTcWarps) {
    const int64_t token = t0 + first + t;
    if (token >= p.tokens) continue;
    route_select(rounded + t * kExperts, p.experts, p.top_k, p.expert_scale, p.weights + token * p.top_k,
                 p.ids + token * p.top_k, lane);
  }
}

// When the tensor-core router spreads a block's K chunks over a cluster: auto (when the clusters of all blocks fit one
// wave of the multiprocessors), always (where the hidden size has a K tile per chunk) or never. The tiles "tc",
// "tc_cluster" and "tc_single" (kRouteTiles); the sums, so the routes, are the same in every mode.
enum class RouteCluster { kAuto, kAlways, kNever };

// The cluster size of a tensor-core router launch: kRouteTcChunks (one K chunk per block) or 1.
inline int route_tc_splits(int64_t blocks, int hidden, int sms, RouteCluster mode = RouteCluster::kAuto) {
  if (mode == RouteCluster::kNever || hidden / kRouteTcK < kRouteTcChunks) return 1;
  return mode == RouteCluster::kAlways || blocks * kRouteTcChunks <= sms ? kRouteTcChunks : 1;
}

inline int multiprocessor_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;  // no split: the launch reports the device's error itself
  }
  return sms;
}

template <int kNTiles, int kStages>
cudaError_t launch_route_tc_stages(const RouteParams& p, cudaStream_t stream, RouteCluster mode) {
  const size_t smem = route_tc_smem_bytes(p.hidden, p.experts, kStages);
  cudaError_t err = allow_dynamic_smem<route_tc_kernel<kNTiles, kStages>>(smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.tokens + kRouteTcTokens - 1) / kRouteTcTokens;
  const int splits = route_tc_splits(blocks, p.hidden, multiprocessor_count(), mode);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  err = launch_kernel_clustered(route_tc_kernel<kNTiles, kStages>, grid, kRouteTcWarps * 32, smem, stream,
                                dim3(1, static_cast<unsigned>(splits), 1), p);
  // A cluster that cannot be scheduled here: unclustered blocks (the same sums in the same order: the same routes).
  if (err != cudaSuccess && splits > 1)
    err = launch_kernel(route_tc_kernel<kNTiles, kStages>, static_cast<unsigned>(blocks), kRouteTcWarps * 32, smem,
                        stream, p);
  return err;
}

// The deep pipeline where it fits (never for 256 experts: its stages with the token rows and logits exceed the shared
// memory at any hidden size), else 3 stages.
// The depth changes when tiles arrive, not what is summed: the routes are the same either way.
template <int kNTiles>
cudaError_t launch_route_tc(const RouteParams& p, cudaStream_t stream, RouteCluster mode) {
  constexpr int kExperts = kNTiles * 8 * kRouteTcWarps;
  if constexpr (route_tc_smem_bytes(kRouteTcK, kExperts, kRouteTcDeepStages) <= kRouteMaxSmemBytes) {
    if (route_tc_stages(p.hidden, p.experts) == kRouteTcDeepStages)
      return launch_route_tc_stages<kNTiles, kRouteTcDeepStages>(p, stream, mode);
  }
  return launch_route_tc_stages<kNTiles, kRouteTcStages>(p, stream, mode);
}

// A compiled router variant: the tensor-core kernel (tensor_cores) or route_kernel<tokens, warps>.
struct RouteTile {
  int tokens, warps;
  bool tensor_cores;
  const char* name;
};

// The variants compiled in, by name; the first is the default (the tensor-core kernel where its sizes fit,
// else route_kernel<4, 8>). "tc_cluster" / "tc_single": the tensor-core kernel always / never clustered (RouteCluster).
constexpr RouteTile kRouteTiles[] = {
    {kRouteTcTokens, kRouteTcWarps, true, "tc"}, {4, 8, false, "4x8"}, {8, 8, false, "8x8"},
    {2, 8, false, "2x8"}, {1, 8, false, "1x8"}, {kRouteTcTokens, kRouteTcWarps, true, "tc_cluster"},
    {kRouteTcTokens, kRouteTcWarps, true, "tc_single"}};

template <int T, int W>
cudaError_t launch_route(const RouteParams& p, cudaStream_t stream) {
  const size_t smem = route_smem_bytes(p.hidden, p.experts, T);
  const int64_t blocks = (p.tokens + T - 1) / T;
  return launch_kernel_smem<route_kernel<T, W>>(static_cast<unsigned>(blocks), W * 32, smem, stream, p);
}

// `tile` indexes kRouteTiles (0 or out of range: the default). With res.y set, x_stride == hidden.
inline cudaError_t route(const RouteParams& p, cudaStream_t stream, int tile = 0) {
  if (p.tokens == 0) return cudaSuccess;
  switch (tile) {
    case 1: return launch_route<4, 8>(p, stream);
    case 2: return launch_route<8, 8>(p, stream);
    case 3: return launch_route<2, 8>(p, stream);
    case 4: return launch_route<1, 8>(p, stream);
    default: {
      if (!route_tc_fits(p.hidden, p.experts)) return launch_route<4, 8>(p, stream);
      const RouteCluster mode = tile == 5 ? RouteCluster::kAlways : tile == 6 ? RouteCluster::kNever
                                                                             : RouteCluster::kAuto;
      switch (p.experts) {
        case 64: return launch_route_tc<2>(p, stream, mode);
        case 128: return launch_route_tc<4>(p, stream, mode);
        default: return launch_route_tc<8>(p, stream, mode);
      }
    }
  }
}

}  // namespace dgemma::kernels
