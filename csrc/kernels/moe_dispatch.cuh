// MoE dispatch, entirely on the device (no host synchronisation; CUDA-graph safe):
//   moe_plan:             per-expert offsets and each (token, slot)'s row in the expert-sorted order
//   moe_gather_quantize:  per-token FP8 quantisation (optionally of the token's RMSNorm), written straight to the
//                         token's sorted rows
//   moe_combine:          the weighted un-permute of the down projection back to token order
// The plan can pad each expert's rows to a whole number of GEMM tiles (the contiguous expert GEMM).
//
// Sorted order (python/dgemma/ops/cuda_moe.py `plan_dispatch` is the reference): rows are grouped by
// expert in ascending id; within an expert they keep the slot-major order of (slot, token), i.e. a
// stable sort of ids.t().flatten() — the order the reference gathers tokens in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8_epilogue.cuh"
#include "kernels/fp8_quant.cuh"
#include "kernels/moe_plan_limits.h"
#include "kernels/pdl.cuh"
#include "kernels/rms_norm.cuh"

namespace dgemma::kernels {

constexpr int kPlanWarps = kPlanThreads / 32;  // kPlanThreads, kPlanMaxExperts: moe_plan_limits.h

// One block. ids [tokens, top_k] int32. Outputs: offsets [experts + 1] (offsets[experts] = rows routed
// to a valid expert), row_of [tokens * top_k] (sorted row of (token, slot) at token * top_k + slot; -1
// when the id is outside [0, experts): such a slot contributes nothing), row_expert [tokens * top_k]
// (expert of each sorted row; entries past offsets[experts] are not written).
// NOTE: positions come from a chunked stable counting sort (warp match + per-warp prefix counts), so
// they are identical run to run; only integer atomics on shared memory are used.
// With pad > 1 (the contiguous expert GEMM, sm90_moe_grouped_gemm.cuh) every expert's rows are padded to a multiple
// of pad: offsets[e] are the padded starts (offsets[experts] the padded total), the padding rows follow each
// expert's real rows, and the plan also writes (when given) row_src [padded rows] (token * top_k + slot of each
// row; -1 for padding), tile_expert [padded rows / pad] (the expert of each pad-row tile) and num_tiles[0];
// row_expert then covers the padding rows too.
//
// Large inputs (more than kPlanSingleBlockMax entries, given scratch for per-chunk counts) run the same plan on
// every SM: moe_plan_count_kernel (per-chunk counts), moe_plan_scan_kernel (per-chunk bases, the offsets, the
// padding), moe_plan_assign_kernel (each chunk's rows): the same rows, no serial pass over all entries.
struct PlanOutputs {
  int32_t* offsets;
  int32_t* row_of;
  int32_t* row_expert;
  int32_t* row_src;      // may be null
  int32_t* tile_expert;  // may be null
  int32_t* num_tiles;    // may be null
};

// The entries a plan sorts: each token's top_k routed slots (ids [tokens, top_k]; an id outside [0, routed) is
// dropped) followed by `shared` slots that every token has, slot top_k + j naming expert routed + j (shared
// experts: e.g. a dense MLP cut into expert-sized pieces). An entry's index into row_of is token * slots() + slot.
struct PlanIds {
  const int32_t* ids;
  int top_k;
  int routed;
  int shared;
  __host__ __device__ __forceinline__ int slots() const { return top_k + shared; }
  __host__ __device__ __forceinline__ int experts() const { return routed + shared; }
  __device__ __forceinline__ int expert(int token, int slot) const {
    if (slot >= top_k) return routed + slot - top_k;
    const int e = ids[static_cast<int64_t>(token) * top_k + slot];
    return e >= 0 && e < routed ? e : -1;
  }
};

// Warp 0: the padded exclusive scan of counts[e] (in `base`) into base[e] = start[e] = offsets[e].
__device__ __forceinline__ void plan_scan(int* base, int* start, int experts, int pad, const PlanOutputs& out,
                                          int lane) {
  const int per_lane = (experts + 31) / 32;
  int local = 0;
  for (int j = 0; j < per_lane; ++j) {
    const int e = lane * per_lane + j;
    if (e < experts) local += (base[e] + pad - 1) / pad * pad;
  }
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  int run = incl - local;
  for (int j = 0; j < per_lane; ++j) {
    const int e = lane * per_lane + j;
    if (e < experts) {
      const int c = (base[e] + pad - 1) / pad * pad;
      base[e] = run;
      start[e] = run;
      out.offsets[e] = run;
      run += c;
    }
  }
  if (lane == 31) {
    out.offsets[experts] = incl;
    start[experts] = incl;
    if (out.num_tiles != nullptr) out.num_tiles[0] = incl / pad;
  }
}

// The expert of slot-major entry i (slot = i / tokens, token = i % tokens); -1 past the entries or for a dropped id.
__device__ __forceinline__ int plan_entry_expert(const PlanIds& in, int tokens, int i) {
  return i < tokens * in.slots() ? in.expert(i % tokens, i / tokens) : -1;
}

// The rows of one chunk of kPlanThreads slot-major entries starting at c0: entry i = c0 + tid (expert e, from
// plan_entry_expert) goes to row base[e] + (its rank among the chunk's entries of expert e); base[e] advances by the
// chunk's count. Every thread of the block calls it (barriers inside).
__device__ __forceinline__ void plan_assign_chunk(const PlanIds& in, int tokens, int c0, int e, int* base,
                                                  int (*warp_count)[kPlanMaxExperts], const PlanOutputs& out) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int slots = in.slots(), experts = in.experts();
  const int total = tokens * slots;
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int j = tid; j < kPlanWarps * experts; j += kPlanThreads) warp_count[j / experts][j % experts] = 0;
  const int i = c0 + tid;
  const int src = i < total ? (i % tokens) * slots + i / tokens : 0;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(peers & lt_mask);
  __syncthreads();
  if (e >= 0 && rank == 0) warp_count[warp][e] = __popc(peers);
  __syncthreads();
  for (int x = tid; x < experts; x += kPlanThreads) {
    int run = base[x];
    for (int w = 0; w < kPlanWarps; ++w) {
      const int n = warp_count[w][x];
      warp_count[w][x] = run;
      run += n;
    }
    base[x] = run;
  }
  __syncthreads();
  if (i < total) {
    if (e >= 0) {
      const int row = warp_count[warp][e] + rank;
      out.row_of[src] = row;
      out.row_expert[row] = e;
      if (out.row_src != nullptr) out.row_src[row] = src;
    } else {
      out.row_of[src] = -1;
    }
  }
  __syncthreads();
}

// The padding rows of a padded plan: ends[e] is the end of expert e's real rows, start the padded starts.
__device__ __forceinline__ void plan_fill_padding(const int* ends, const int* start, int experts, int pad,
                                                  const PlanOutputs& out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int e = warp; e < experts; e += blockDim.x / 32) {
    for (int r = ends[e] + lane; r < start[e + 1]; r += 32) {
      out.row_expert[r] = e;
      if (out.row_src != nullptr) out.row_src[r] = -1;
    }
    if (out.tile_expert != nullptr)
      for (int t = start[e] / pad + lane; t < start[e + 1] / pad; t += 32) out.tile_expert[t] = e;
  }
}

// Chunks whose entries' experts the single-block plan keeps in registers from the count to the assignment (read
// once, every load in flight at once); chunks past them (a single-block plan of a large input) read theirs again.
constexpr int kPlanHeldChunks = 16;

static __global__ void __launch_bounds__(kPlanThreads)
    moe_plan_kernel(PlanIds in, int tokens, int pad, PlanOutputs out) {
  pdl_begin();
  __shared__ int base[kPlanMaxExperts];
  __shared__ int start[kPlanMaxExperts + 1];
  __shared__ int warp_count[kPlanWarps][kPlanMaxExperts];
  const int tid = threadIdx.x;
  const int slots = in.slots(), experts = in.experts();
  const int total = tokens * slots;

  int held[kPlanHeldChunks];
#pragma unroll
  for (int c = 0; c < kPlanHeldChunks; ++c) held[c] = plan_entry_expert(in, tokens, c * kPlanThreads + tid);
  for (int e = tid; e < experts; e += kPlanThreads) base[e] = 0;
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kPlanHeldChunks; ++c)
    if (held[c] >= 0) atomicAdd(&base[held[c]], 1);
  for (int i = kPlanHeldChunks * kPlanThreads + tid; i < total; i += kPlanThreads) {
    const int e = plan_entry_expert(in, tokens, i);
    if (e >= 0) atomicAdd(&base[e], 1);
  }
  __syncthreads();
  if (tid < 32) plan_scan(base, start, experts, pad, out, tid);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kPlanHeldChunks; ++c)
    if (c * kPlanThreads < total) plan_assign_chunk(in, tokens, c * kPlanThreads, held[c], base, warp_count, out);
  for (int c0 = kPlanHeldChunks * kPlanThreads; c0 < total; c0 += kPlanThreads)
    plan_assign_chunk(in, tokens, c0, plan_entry_expert(in, tokens, c0 + tid), base, warp_count, out);
  // base[e] is now the end of expert e's real rows: the rest up to the next start is padding.
  if (pad > 1) plan_fill_padding(base, start, experts, pad, out);
}

// Multi-block plan, 1/3: chunk_counts[c * experts + e] = entries of expert e in chunk c (slot-major order).
static __global__ void __launch_bounds__(kPlanThreads)
    moe_plan_count_kernel(PlanIds in, int tokens, int32_t* __restrict__ chunk_counts) {
  pdl_begin();
  __shared__ int count[kPlanMaxExperts];
  const int experts = in.experts();
  for (int e = threadIdx.x; e < experts; e += kPlanThreads) count[e] = 0;
  __syncthreads();
  const int i = blockIdx.x * kPlanThreads + threadIdx.x;
  if (i < tokens * in.slots()) {
    const int e = in.expert(i % tokens, i / tokens);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += kPlanThreads)
    chunk_counts[static_cast<int64_t>(blockIdx.x) * experts + e] = count[e];
}

// 2/3, one block: chunk_counts becomes each chunk's first row per expert (exclusive, offsets included); the offsets,
// the padding rows and the tile table are written.
static __global__ void __launch_bounds__(kPlanThreads)
    moe_plan_scan_kernel(int chunks, int experts, int pad, int32_t* __restrict__ chunk_counts, PlanOutputs out) {
  pdl_begin();
  __shared__ int base[kPlanMaxExperts];
  __shared__ int start[kPlanMaxExperts + 1];
  __shared__ int ends[kPlanMaxExperts];
  for (int e = threadIdx.x; e < experts; e += kPlanThreads) {
    int run = 0;
    for (int c = 0; c < chunks; ++c) {
      int32_t* p = chunk_counts + static_cast<int64_t>(c) * experts + e;
      const int n = *p;
      *p = run;
      run += n;
    }
    base[e] = run;
    ends[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) plan_scan(base, start, experts, pad, out, threadIdx.x);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += kPlanThreads) ends[e] += start[e];
  for (int j = threadIdx.x; j < chunks * experts; j += kPlanThreads) chunk_counts[j] += start[j % experts];
  __syncthreads();
  if (pad > 1) plan_fill_padding(ends, start, experts, pad, out);
}

// 3/3: each block places its chunk's entries from the chunk's first rows.
static __global__ void __launch_bounds__(kPlanThreads)
    moe_plan_assign_kernel(PlanIds in, int tokens, const int32_t* __restrict__ chunk_base, PlanOutputs out) {
  pdl_begin();
  __shared__ int base[kPlanMaxExperts];
  __shared__ int warp_count[kPlanWarps][kPlanMaxExperts];
  const int experts = in.experts();
  for (int e = threadIdx.x; e < experts; e += kPlanThreads)
    base[e] = chunk_base[static_cast<int64_t>(blockIdx.x) * experts + e];
  __syncthreads();
  const int c0 = blockIdx.x * kPlanThreads;
  plan_assign_chunk(in, tokens, c0, plan_entry_expert(in, tokens, c0 + threadIdx.x), base, warp_count, out);
}

// Above this many entries the plan runs on every SM (when given scratch): a single block walks them in order, a chunk
// of kPlanThreads entries after another (a step's 256 tokens x 11 slots: 3 chunks, 22 us per layer on an H200 at
// c4fb56a; four canvases: 11 chunks, 52 us); the three kernels each take one pass.
constexpr int kPlanSingleBlockMax = 4 * kPlanThreads;
static_assert(kPlanSingleBlockMax <= kPlanHeldChunks * kPlanThreads,
              "a single-block plan holds all its entries' experts in registers (else it reads the rest again)");

// experts: the experts ids name; `shared` more follow them (see PlanIds): offsets then has experts + shared + 1
// entries and row_of tokens * (top_k + shared).
inline cudaError_t moe_plan(const int32_t* ids, int tokens, int top_k, int experts, int32_t* offsets, int32_t* row_of,
                            int32_t* row_expert, cudaStream_t stream, int pad = 1, int32_t* row_src = nullptr,
                            int32_t* tile_expert = nullptr, int32_t* num_tiles = nullptr,
                            int32_t* scratch = nullptr, int shared = 0) {
  const PlanOutputs out{offsets, row_of, row_expert, row_src, tile_expert, num_tiles};
  const PlanIds in{ids, top_k, experts, shared};
  const int total = tokens * in.slots();
  if (scratch == nullptr || total <= kPlanSingleBlockMax) {
    return launch_kernel(moe_plan_kernel, 1, kPlanThreads, 0, stream, in, tokens, pad, out);
  }
  const int chunks = (total + kPlanThreads - 1) / kPlanThreads;
  cudaError_t err = launch_kernel(moe_plan_count_kernel, chunks, kPlanThreads, 0, stream, in, tokens, scratch);
  if (err == cudaSuccess)
    err = launch_kernel(moe_plan_scan_kernel, 1, kPlanThreads, 0, stream, chunks, in.experts(), pad, scratch, out);
  if (err == cudaSuccess)
    err = launch_kernel(moe_plan_assign_kernel, chunks, kPlanThreads, 0, stream, in, tokens, scratch, out);
  return err;
}

constexpr int kGatherThreads = 128;
constexpr int kGatherMaxVecs = 4;
constexpr int kGatherMaxHidden = kGatherThreads * kGatherMaxVecs * 8;  // 4096

// One block per token: quantise x[token] once (per-token scale), then write the FP8 row to each of the
// token's sorted rows. hidden % 8 == 0, hidden <= kGatherMaxHidden, 16-byte aligned rows.
// With a padded plan (padding != nullptr: offsets [experts + 1], row_src, pad), `experts` more blocks follow the
// token blocks, block tokens + e zeroing expert e's padding rows (their x_scale too): the GEMM reads whole tiles.
struct GatherPadding {
  const int32_t* offsets;
  const int32_t* row_src;
  int pad;
};

// With apply, each token is rms_norm(x) [* weight] first (the layer's pre-MoE norm), with the arithmetic of
// rms_norm_kernel (warp 0 reduces the row in that kernel's order), so the quantised rows equal those of the
// norm kernel followed by this one. With shared_weight (and shared slots, see PlanIds), the rows of slots from
// top_k on see rms_norm(x) * shared_weight instead (their own per-token scale): e.g. the dense MLP's pre-norm.
struct GatherNorm {
  bool apply;
  const __nv_bfloat16* weight;
  float eps;
  const __nv_bfloat16* shared_weight = nullptr;
  int top_k = 0;
};

// One token's values (normed with `weight` when norm.apply) quantised per token into q; returns the scale.
__device__ __forceinline__ float gather_quantize_row(const __nv_bfloat16* __restrict__ xr, int vecs,
                                                     const GatherNorm& norm, const __nv_bfloat16* weight,
                                                     float inv_rms, float* red, uint2 (&q)[kGatherMaxVecs]) {
  float v[kGatherMaxVecs][8];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kGatherMaxVecs; ++j) {
    const int c = threadIdx.x + j * kGatherThreads;
    if (c < vecs) {
      if (norm.apply) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[j][i] = __bfloat162float(normed(xr, weight, 8 * c + i, inv_rms));
      } else {
        load_bf16x8(xr + 8 * c, v[j]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[j][i]));
    }
  }
  const float s = fp8_scale_from_amax(block_max(amax, red));
#pragma unroll
  for (int j = 0; j < kGatherMaxVecs; ++j) q[j] = threadIdx.x + j * kGatherThreads < vecs ? fp8x8(v[j], s) : uint2{};
  return s;
}

static __global__ void __launch_bounds__(kGatherThreads)
    moe_gather_quantize_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_stride, int64_t tokens, int hidden,
                               int slots, const int32_t* __restrict__ row_of, uint8_t* __restrict__ xq,
                               float* __restrict__ x_scale, GatherPadding padding, GatherNorm norm) {
  pdl_begin();
  __shared__ float red[32];
  __shared__ float inv_rms;
  const int64_t t = blockIdx.x;
  if (t >= tokens) {
    const int64_t e = t - tokens;
    const int end = padding.offsets[e + 1];
    const int first = max(padding.offsets[e], end - padding.pad + 1);
    for (int r = first; r < end; ++r) {
      if (padding.row_src[r] >= 0) continue;  // uniform per block
      uint8_t* out = xq + static_cast<int64_t>(r) * hidden;
      for (int c = threadIdx.x; c < hidden / 8; c += kGatherThreads) *reinterpret_cast<uint2*>(out + 8 * c) = uint2{};
      if (threadIdx.x == 0) x_scale[r] = 0.f;
    }
    return;
  }
  const __nv_bfloat16* xr = x + t * x_stride;
  const int vecs = hidden / 8;
  if (norm.apply) {
    // The row into shared memory in one round trip (16-byte loads by every thread), then warp 0's reduction over it in
    // rms_norm_kernel's order, where it would wait on L2 once per batch of a lane's elements.
    __shared__ __align__(16) __nv_bfloat16 row[kGatherMaxHidden];
    for (int c = threadIdx.x; c < vecs; c += kGatherThreads)
      *reinterpret_cast<uint4*>(row + 8 * c) = *reinterpret_cast<const uint4*>(xr + 8 * c);
    __syncthreads();
    xr = row;
    if (threadIdx.x < 32) {
      const float r = row_inv_rms(xr, hidden, norm.eps, threadIdx.x);
      if (threadIdx.x == 0) inv_rms = r;
    }
    __syncthreads();
  }
  // Slots [0, split) from norm.weight; [split, slots) (shared experts with a norm of their own) from shared_weight.
  const int split = norm.apply && norm.shared_weight != nullptr ? norm.top_k : slots;
  uint2 q[kGatherMaxVecs];
  float s = 0.f;
  for (int k = 0; k < slots; ++k) {
    if (k == 0 || k == split)
      s = gather_quantize_row(xr, vecs, norm, k < split ? norm.weight : norm.shared_weight,
                              norm.apply ? inv_rms : 0.f, red, q);
    const int row = row_of[t * slots + k];
    if (row < 0) continue;
    uint8_t* out = xq + static_cast<int64_t>(row) * hidden;
#pragma unroll
    for (int j = 0; j < kGatherMaxVecs; ++j) {
      const int c = threadIdx.x + j * kGatherThreads;
      if (c < vecs) *reinterpret_cast<uint2*>(out + 8 * c) = q[j];
    }
    if (threadIdx.x == 0) x_scale[row] = s;
  }
}

inline cudaError_t moe_gather_quantize(const __nv_bfloat16* x, int64_t x_stride, int64_t tokens, int hidden, int slots,
                                       const int32_t* row_of, uint8_t* xq, float* x_scale, cudaStream_t stream,
                                       GatherPadding padding = {nullptr, nullptr, 1}, int experts = 0,
                                       GatherNorm norm = {false, nullptr, 0.f}) {
  if (tokens == 0) return cudaSuccess;
  const int64_t blocks = tokens + (padding.offsets != nullptr ? experts : 0);
  return launch_kernel(moe_gather_quantize_kernel, static_cast<unsigned>(blocks), kGatherThreads, 0, stream, x,
                       x_stride, tokens, hidden, slots, row_of, xq, x_scale, padding, norm);
}

constexpr int kCombineThreads = 128;

// Grid (tokens, ceil(hidden / (8 * kCombineThreads))). out[t, c] = bf16(sum_k weights[t, k] * h_scale[row]
// * w_scale[e, c] * d[row, c]) with row = row_of[t, k], e = ids[t, k], summed in slot order in fp32:
// deterministic, no atomics. d: [rows, hidden] bf16 (the unscaled down projection). With w_scale null, d is the
// weighted, scaled down projection and out[t, c] = bf16(sum_k d[row, c]) (h_scale, ids, weights unused); then with
// shared_out, slots from top_k on (shared experts, see PlanIds) are summed into shared_out[t] instead.
// row_of has `slots` entries per token.
static __global__ void __launch_bounds__(kCombineThreads)
    moe_combine_kernel(const __nv_bfloat16* __restrict__ d, const float* __restrict__ h_scale,
                       const float* __restrict__ w_scale, const int32_t* __restrict__ ids,
                       const float* __restrict__ weights, const int32_t* __restrict__ row_of, int hidden, int slots,
                       int top_k, __nv_bfloat16* __restrict__ out, __nv_bfloat16* __restrict__ shared_out,
                       int64_t out_stride) {
  pdl_begin();
  const int64_t t = blockIdx.x;
  const int c = 8 * (blockIdx.y * kCombineThreads + threadIdx.x);
  if (c >= hidden) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < slots; ++k) {
    if (k == top_k && shared_out != nullptr) {  // the routed sum is complete; the shared experts' sum follows
      store_bf16x8(out + t * out_stride + c, acc);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    }
    const int row = row_of[t * slots + k];
    if (row < 0) continue;
    float v[8];
    load_bf16x8(d + static_cast<int64_t>(row) * hidden + c, v);
    if (w_scale == nullptr) {  // d is already weighted and scaled (the contiguous GEMM's epilogue)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += v[i];
      continue;
    }
    const int64_t e = ids[t * slots + k];
    const float a = weights[t * slots + k] * h_scale[row];
    const float* ws = w_scale + e * hidden + c;
    const float4 w0 = *reinterpret_cast<const float4*>(ws);
    const float4 w1 = *reinterpret_cast<const float4*>(ws + 4);
    const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = fmaf(a * wv[i], v[i], acc[i]);
  }
  store_bf16x8((shared_out != nullptr ? shared_out : out) + t * out_stride + c, acc);
}

// slots: entries of row_of per token; shared_out (contiguous pipeline only, w_scale null): where slots top_k.. go.
inline cudaError_t moe_combine(const __nv_bfloat16* d, const float* h_scale, const float* w_scale, const int32_t* ids,
                               const float* weights, const int32_t* row_of, int64_t tokens, int hidden, int slots,
                               __nv_bfloat16* out, int64_t out_stride, cudaStream_t stream,
                               __nv_bfloat16* shared_out = nullptr, int top_k = 0) {
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tokens), (hidden / 8 + kCombineThreads - 1) / kCombineThreads);
  return launch_kernel(moe_combine_kernel, grid, kCombineThreads, 0, stream, d, h_scale, w_scale, ids, weights,
                       row_of, hidden, slots, shared_out != nullptr ? top_k : slots, out, shared_out, out_stride);
}

}  // namespace dgemma::kernels
