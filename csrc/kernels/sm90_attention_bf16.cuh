// Tensor-core attention over [cached prefix ; tail] for DiffusionGemma: bf16 Q/K/V, fp32 softmax,
// scale 1, grouped KV heads. One kernel serves both passes:
//   decoder: queries = the canvas, keys = visible prefix + the canvas's own K/V, bidirectional;
//   encoder: queries = new tokens, keys = visible prefix + the new tokens' K/V, causal (+ window).
// The prefix is read from the KV cache in place (a ring of `ring_size` slots for sliding layers,
// slot = position % ring_size; position p at slot p otherwise); the tail comes from its own tensor
// because the cache is written only after the layer ran.
//
// Algorithm: flash attention with mma.sync m16n8k16 (bf16 in, fp32 accumulate), online softmax,
// cp.async K/V tiles in a two- or three-stage pipeline (DGEMMA_ATTENTION_STAGES), optional split-KV with the combine fused: the CTAs of one query tile's splits
// write fp32 partials, and the last of them to finish (a counter per query tile) combines them into the output.
// NOTE: a warp owns 16 query rows x a 128-wide slice of the head dim (see attention_tiles.cuh), so
// the O accumulator stays at 64 registers per thread even for head_dim 512. The price is that the
// QK^T partial sums of the NS slices of a row group are exchanged through shared memory every tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_tiles.cuh"
#include "kernels/pdl.cuh"
#include "kernels/warp_mma_sm80.cuh"

namespace dgemma::kernels {

// Strides are in elements; the head dim is always contiguous.
struct AttentionParams {
  const __nv_bfloat16* q;  // [B, Hq, T, D]
  int64_t q_sb, q_sh, q_st;
  const __nv_bfloat16* cache_k;  // [B, Hkv, slots, D]
  const __nv_bfloat16* cache_v;
  int64_t ck_sb, ck_sh, ck_ss, cv_sb, cv_sh, cv_ss;
  const __nv_bfloat16* tail_k;  // [B, Hkv, T, D]
  const __nv_bfloat16* tail_v;
  int64_t tk_sb, tk_sh, tk_st, tv_sb, tv_sh, tv_st;
  const int32_t* prefix_lens;  // [B] cached tokens per sequence (clamped to max_prefix)
  const uint8_t* valid;        // [B, >= valid_limit] or null: false positions are never attended
  int64_t valid_sb;
  __nv_bfloat16* out;  // [B, T, Hq, D]
  int64_t o_sb, o_st, o_sh;
  float* part_o;    // [num_splits, B, Hq, T, D] (num_splits > 1 only)
  float* part_lse;  // [num_splits, B, Hq, T]
  // [B, Hq, query tiles] arrival counters (num_splits > 1 only): zero before the launch, and zero again after it
  // (the last split of each query tile resets its counter once every split has arrived).
  int* split_counters;
  int batch, hq, hkv, t;
  int max_prefix;     // upper bound of prefix_lens (sizes the grid; clamps device values)
  int ring_size;      // 0: position p at slot p
  int window;         // 0: none; else the prefix holds min(L, window-1) positions (and causal rows see window keys)
  int causal;         // 1: encoder mask (key position <= query position)
  int valid_tail;     // 1: `valid` also covers the tail's positions L..L+T-1
  int num_splits;     // key tiles are cut into chunks of split_tiles, one per split
  int split_tiles;
  int wgmma_pingpong;  // the wgmma kernel at head_dim 256: warpgroup 1 issues its Q·Kᵀ after warpgroup 0's
  int stages;          // the mma.sync kernel's key pipeline: 2 (each tile requested one tile ahead) or 3 (two ahead)
};

namespace attention_detail {

template <int D>
struct Shape {
  static constexpr int kBlockM = attention_block_m(D);
  static constexpr int kBlockN = attention_block_n(D);
  static constexpr int kSlices = D / kAttentionSliceDim;
  static constexpr int kRowGroups = kAttentionThreads / 32 / kSlices;
  static constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  static constexpr int kTileElems = kBlockN * D;
  static constexpr int kSTiles = kBlockN / 8;  // n-tiles of a warp's S
  // Shared memory with `stages` K/V tiles in flight + 1: the tiles, their key masks, the slices' partial scores.
  static constexpr size_t smem_bytes(int stages) {
    return size_t(stages) * 2 * kTileElems * sizeof(__nv_bfloat16) + size_t(stages) * kBlockN * sizeof(int) +
           size_t(kAttentionThreads / 32) * kSTiles * 32 * sizeof(float4);
  }
  // 227 KB is an SM's opt-in limit for dynamic and static shared memory together; the kernel's static variables
  // (the split counter's flag) take well under the 1 KB kept free here.
  static_assert(smem_bytes(3) + 1024 <= 227 * 1024, "three stages fit one SM");
  static_assert(kRowGroups * 16 == kBlockM, "block rows must match the warp layout");
  static_assert(kAttentionThreads % kChunksPerRow == 0, "tile loader layout");
};

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  cp_async_16(dst, src, pred ? 16 : 0);  // 0: zero-fill (rows past the key range must be finite zeros)
}

// NOTE: rows of a K/V tile are 512 or 1024 bytes, so unswizzled ldmatrix reads of 8 rows would all hit
// the same banks. The 16-byte chunk index is XORed with (row % 8), a permutation within each 128-byte group.
template <int D>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t load_b32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Sequence-level key geometry: keys are indexed kv = 0..n_kv-1, prefix first; key kv has position pstart + kv.
struct KeyRange {
  int n_prefix, pstart, n_kv;
};

__host__ __device__ __forceinline__ KeyRange key_range(const AttentionParams& p, int b) {
  int len = min(max(p.prefix_lens[b], 0), p.max_prefix);
  KeyRange r;
  r.n_prefix = p.window > 0 ? min(len, p.window - 1) : len;
  r.pstart = len - r.n_prefix;
  r.n_kv = r.n_prefix + p.t;
  return r;
}

// This split's key tiles, [split·split_tiles, (split + 1)·split_tiles) intersected with the tiles from `lo` / up to
// `hi`; products in 64 bits (split_tiles may be up to 2^30).
__device__ __forceinline__ int split_tile_lo(int lo, int split, int split_tiles) {
  return static_cast<int>(min(max(int64_t(lo), int64_t(split) * split_tiles), int64_t(INT32_MAX)));
}
__device__ __forceinline__ int split_tile_hi(int hi, int split, int split_tiles) {
  return static_cast<int>(min(int64_t(hi), (int64_t(split) + 1) * split_tiles));
}

// Whether this CTA is the last of `splits` to arrive at *counter (every thread of the CTA calls it after its partial
// writes; all get the answer). Release: each thread fences its writes before thread 0 counts the CTA in; the last
// CTA resets the counter for the next launch and fences again before reading the others' partials.
__device__ __forceinline__ bool last_split_to_arrive(int* counter, int splits) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(counter, 1) == splits - 1;
    if (last) *counter = 0;
    s_last = last;
  }
  __syncthreads();
  const bool last = s_last != 0;
  if (last) __threadfence();
  return last;
}

// out[b, t, h][4c : 4c+4] = Σ_s exp(lse_s − max lse)·o_s / Σ_s exp(lse_s − max lse) from the splits' fp32 partials
// (read through L2: other CTAs wrote them); a row no split saw is 0.
template <int D>
__device__ __forceinline__ void combine_split_chunk(const AttentionParams& p, int b, int h, int t, int c) {
  const int64_t split_stride = int64_t(p.batch) * p.hq * p.t;
  const int64_t row = (int64_t(b) * p.hq + h) * p.t + t;
  float lmax = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) lmax = fmaxf(lmax, __ldcg(p.part_lse + s * split_stride + row));
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lmax != -INFINITY) {
    float wsum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse = __ldcg(p.part_lse + s * split_stride + row);
      if (lse == -INFINITY) continue;
      const float w = expf(lse - lmax);
      wsum += w;
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p.part_o + (s * split_stride + row) * D) + c);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    const float iw = 1.f / wsum;
    acc.x *= iw;
    acc.y *= iw;
    acc.z *= iw;
    acc.w *= iw;
  }
  __nv_bfloat16* orow = p.out + b * p.o_sb + int64_t(t) * p.o_st + h * p.o_sh + c * 4;
  reinterpret_cast<__nv_bfloat162*>(orow)[0] = __floats2bfloat162_rn(acc.x, acc.y);
  reinterpret_cast<__nv_bfloat162*>(orow)[1] = __floats2bfloat162_rn(acc.z, acc.w);
}

// The combine of the `rows` query rows from q0 of (b, h), spread over the CTA.
template <int D>
__device__ __forceinline__ void combine_splits(const AttentionParams& p, int b, int h, int q0, int rows) {
  constexpr int kVecs = D / 4;
  for (int i = threadIdx.x; i < rows * kVecs; i += blockDim.x) combine_split_chunk<D>(p, b, h, q0 + i / kVecs, i % kVecs);
}

// Row r of a combining CTA: query t of head h (t >= p.t: a padding row, left alone).
struct CombineRow {
  int h, t;
};

constexpr int kCombineItems = 4;  // (row, 4-column) items a thread combines side by side
constexpr int kCombineBatch = 4;  // splits whose partial rows an item loads at once

// Shared memory combine_split_rows needs for `rows` rows of `splits` splits, in floats.
__host__ __device__ constexpr int64_t combine_smem_floats(int rows, int splits) {
  return int64_t(rows) * (int64_t(splits) + 1);
}

// combine_split_chunk of every 4-column item of `rows` rows (row_at(r): the CombineRow of row r), with its arithmetic
// in its order, so the output is the same bit for bit. What changes is when the loads happen: the splits'
// log-sum-exps are read once per row into shared memory (smem: combine_smem_floats(rows, splits) floats that the
// caller's threads no longer use), and a thread combines kCombineItems items at once with kCombineBatch splits'
// partial rows of each in flight, rather than one item after another with a round trip to L2 per split (the combining
// CTA otherwise spends longer waiting on those than the splits took to compute).
template <int D, typename RowAt>
__device__ __forceinline__ void combine_split_rows(const AttentionParams& p, int b, int rows, RowAt&& row_at,
                                                   float* smem) {
  const int splits = p.num_splits;
  const int64_t split_stride = int64_t(p.batch) * p.hq * p.t;
  float* lse_of = smem;                  // [rows][splits]
  float* lmax_of = smem + rows * splits;  // [rows]
  for (int i = threadIdx.x; i < rows * splits; i += blockDim.x) {
    const int r = i / splits, s = i - r * splits;
    const CombineRow x = row_at(r);
    lse_of[i] = x.t < p.t ? __ldcg(p.part_lse + s * split_stride + (int64_t(b) * p.hq + x.h) * p.t + x.t) : -INFINITY;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    float lmax = -INFINITY;
    for (int s = 0; s < splits; ++s) lmax = fmaxf(lmax, lse_of[r * splits + s]);
    lmax_of[r] = lmax;
  }
  __syncthreads();
  constexpr int kVecs = D / 4;
  const int items = rows * kVecs;
  for (int first = threadIdx.x; first < items; first += kCombineItems * blockDim.x) {
    int r[kCombineItems], c[kCombineItems];
    int64_t row[kCombineItems];
    bool live[kCombineItems];
    float lmax[kCombineItems], wsum[kCombineItems];
    float4 acc[kCombineItems];
    CombineRow x[kCombineItems];
#pragma unroll
    for (int k = 0; k < kCombineItems; ++k) {
      const int i = first + k * blockDim.x;
      r[k] = i < items ? i / kVecs : 0;
      c[k] = i % kVecs;
      x[k] = row_at(r[k]);
      live[k] = i < items && x[k].t < p.t;
      row[k] = (int64_t(b) * p.hq + x[k].h) * p.t + x[k].t;
      lmax[k] = live[k] ? lmax_of[r[k]] : -INFINITY;
      wsum[k] = 0.f;
      acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int s0 = 0; s0 < splits; s0 += kCombineBatch) {
      float lse[kCombineItems][kCombineBatch];
      float4 v[kCombineItems][kCombineBatch];
#pragma unroll
      for (int k = 0; k < kCombineItems; ++k)
#pragma unroll
        for (int j = 0; j < kCombineBatch; ++j) {
          const int s = s0 + j;
          lse[k][j] = lmax[k] != -INFINITY && s < splits ? lse_of[r[k] * splits + s] : -INFINITY;
          v[k][j] = lse[k][j] != -INFINITY
                        ? __ldcg(reinterpret_cast<const float4*>(p.part_o + (s * split_stride + row[k]) * D) + c[k])
                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
      for (int k = 0; k < kCombineItems; ++k)
#pragma unroll
        for (int j = 0; j < kCombineBatch; ++j) {
          if (lse[k][j] == -INFINITY) continue;
          const float w = expf(lse[k][j] - lmax[k]);
          wsum[k] += w;
          acc[k].x += w * v[k][j].x;
          acc[k].y += w * v[k][j].y;
          acc[k].z += w * v[k][j].z;
          acc[k].w += w * v[k][j].w;
        }
    }
#pragma unroll
    for (int k = 0; k < kCombineItems; ++k) {
      if (!live[k]) continue;
      if (lmax[k] != -INFINITY) {
        const float iw = 1.f / wsum[k];
        acc[k].x *= iw;
        acc[k].y *= iw;
        acc[k].z *= iw;
        acc[k].w *= iw;
      }
      __nv_bfloat16* orow = p.out + b * p.o_sb + int64_t(x[k].t) * p.o_st + x[k].h * p.o_sh + c[k] * 4;
      reinterpret_cast<__nv_bfloat162*>(orow)[0] = __floats2bfloat162_rn(acc[k].x, acc[k].y);
      reinterpret_cast<__nv_bfloat162*>(orow)[1] = __floats2bfloat162_rn(acc[k].z, acc[k].w);
    }
  }
}

// Where key kv of sequence b (KV head pointers already offset) lives: the cache slot of its position (a ring slot for
// sliding layers) for the prefix, the tail tensor after it. Keys past the range return the tail base (never read:
// their copies are zero-filled). The kernels walk their rows with KeyRowWalk; this per-key definition is what the
// host test (tests/host/attention_key_rows.cu) checks the walk against.
struct KeySource {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
};

__host__ __device__ __forceinline__ KeySource key_source(const AttentionParams& p, const KeyRange& kr,
                                                         const KeySource& cache, const KeySource& tail, int kv) {
  if (kv < kr.n_prefix) {
    const int pos = kr.pstart + kv;
    const int64_t slot = p.ring_size > 0 ? pos % p.ring_size : pos;
    return {cache.k + slot * p.ck_ss, cache.v + slot * p.cv_ss};
  }
  if (kv < kr.n_kv) {
    const int64_t t = kv - kr.n_prefix;
    return {tail.k + t * p.tk_st, tail.v + t * p.tv_st};
  }
  return {p.tail_k, p.tail_v};
}

// key_source of one thread's keys kv0, kv0 + step, kv0 + 2·step, ... across all the key tiles a CTA copies (a thread
// copies the same rows of every tile, and the tiles are consecutive, so its keys are one arithmetic progression), plus
// a column offset: two running pointers advanced by `step` rows, recomputed from key_source only where the keys change
// segment (the ring wraps, the prefix ends, the tail ends: a few times per CTA). Per key a comparison and two pointer
// additions, where evaluating key_source (a ring slot, two 64-bit products, the segment branches) was most of the
// instructions a thread spent gathering a tile. The same addresses (tests/host/attention_key_rows.cu).
struct KeyRowWalk {
  int kv;        // the next key
  int boundary;  // the first key the running pointers do not cover (a segment change): reseated there
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;  // the next key's sources, column offset included
  int dk, dv;              // their advance per step (elements; the launcher keeps step x stride below 2^31)

  __host__ __device__ __forceinline__ KeyRowWalk(const AttentionParams& p, const KeyRange& kr, const KeySource& cache,
                                                 const KeySource& tail, int kv0, int step, int col)
      : kv(kv0) {
    reseat(p, kr, cache, tail, step, col);
  }

  __host__ __device__ __forceinline__ void reseat(const AttentionParams& p, const KeyRange& kr,
                                                  const KeySource& cache, const KeySource& tail, int step, int col) {
    const KeySource src = key_source(p, kr, cache, tail, kv);
    k = src.k + col;
    v = src.v + col;
    if (kv < kr.n_prefix) {
      // Slots run on one at a time from this key's until the ring wraps (or the prefix ends).
      dk = step * static_cast<int>(p.ck_ss);
      dv = step * static_cast<int>(p.cv_ss);
      boundary = kr.n_prefix;
      if (p.ring_size > 0) boundary = min(boundary, kv + (p.ring_size - (kr.pstart + kv) % p.ring_size));
    } else if (kv < kr.n_kv) {
      dk = step * static_cast<int>(p.tk_st);
      dv = step * static_cast<int>(p.tv_st);
      boundary = kr.n_kv;
    } else {  // past the keys: the tail base, never read (the copies are zero-filled)
      dk = dv = 0;
      boundary = 0x7fffffff;
    }
  }

  // The sources of key kv (column offset included); then kv += step.
  __host__ __device__ __forceinline__ KeySource next(const AttentionParams& p, const KeyRange& kr,
                                                    const KeySource& cache, const KeySource& tail, int step, int col) {
    if (kv >= boundary) reseat(p, kr, cache, tail, step, col);
    const KeySource src{k, v};
    kv += step;
    k += dk;
    v += dv;
    return src;
  }
};

// Whether key kv may be attended at all (in range and not masked off by `valid`); causal limits are per query row.
__device__ __forceinline__ int key_allowed(const AttentionParams& p, const KeyRange& kr, int b, int kv) {
  int ok = kv < kr.n_kv;
  const int pos = kr.pstart + kv;
  const int valid_limit = kr.pstart + kr.n_prefix + (p.valid_tail ? p.t : 0);
  if (ok && p.valid != nullptr && pos < valid_limit) ok = p.valid[b * p.valid_sb + pos] != 0;
  return ok;
}

// kStages: K/V tiles in flight + 1 (AttentionParams::stages).
template <int D, int kStages>
__global__ void __launch_bounds__(kAttentionThreads, 1) attention_fwd_kernel(const AttentionParams p) {
  pdl_begin();
  static_assert(kStages == 2 || kStages == 3, "two or three stages");
  using S = Shape<D>;
  constexpr int BM = S::kBlockM, BN = S::kBlockN, NS = S::kSlices, NTS = S::kSTiles;
  constexpr int kQSteps = kAttentionSliceDim / 16;  // k-steps of Q K^T within a slice
  constexpr int kOTiles = kAttentionSliceDim / 8;   // n-tiles of O within a slice
  constexpr int kSliceChunks = kAttentionSliceDim / 8;

  extern __shared__ __align__(128) uint8_t smem[];
  __nv_bfloat16* sk = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sv = sk + kStages * S::kTileElems;
  int* sok = reinterpret_cast<int*>(sv + kStages * S::kTileElems);
  float4* ss = reinterpret_cast<float4*>(sok + kStages * BN);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = warp % NS, rg = warp / NS;
  const int gq = lane >> 2, tq = lane & 3;
  const int q0 = blockIdx.x * BM;
  const int h = blockIdx.y;
  const int b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits;
  const int kvh = h / (p.hq / p.hkv);
  const KeyRange kr = key_range(p, b);

  // Keys this query tile can see, intersected with this split's chunk of key tiles.
  int kv_lo = 0, kv_hi = kr.n_kv;
  if (p.causal) {
    kv_hi = min(kr.n_kv, kr.n_prefix + q0 + BM);
    if (p.window > 0) kv_lo = max(0, kr.n_prefix + q0 - p.window + 1);
  }
  const int tile_lo = split_tile_lo(kv_lo / BN, split, p.split_tiles);
  const int tile_hi = split_tile_hi((kv_hi + BN - 1) / BN, split, p.split_tiles);

  const KeySource cache{p.cache_k + b * p.ck_sb + kvh * p.ck_sh, p.cache_v + b * p.cv_sb + kvh * p.cv_sh};
  const KeySource tail{p.tail_k + b * p.tk_sb + kvh * p.tk_sh, p.tail_v + b * p.tv_sb + kvh * p.tv_sh};

  // This thread's rows of every tile the CTA copies (consecutive tiles from tile_lo): one walk over their keys.
  constexpr int kRowStep = kAttentionThreads / S::kChunksPerRow;  // a thread's rows are kRowStep apart
  static_assert(BN % kRowStep == 0, "every thread copies the same number of rows");
  // (An empty split may have tile_lo far past the keys, where tile_lo · BN would overflow: its walk never runs.)
  KeyRowWalk walk(p, kr, cache, tail, tile_lo < tile_hi ? tile_lo * BN + tid / S::kChunksPerRow : 0, kRowStep,
                  tid % S::kChunksPerRow * 8);
  auto load_tile = [&](int tile, int stage) {
    const int kv0 = tile * BN;
    __nv_bfloat16* dk = sk + stage * S::kTileElems;
    __nv_bfloat16* dv = sv + stage * S::kTileElems;
    const int chunk = tid % S::kChunksPerRow;
#pragma unroll
    for (int i = 0; i < BN / kRowStep; ++i) {
      const int r = tid / S::kChunksPerRow + i * kRowStep, kv = kv0 + r;
      const KeySource src = walk.next(p, kr, cache, tail, kRowStep, chunk * 8);
      const int off = tile_offset<D>(r, chunk);
      cp_async16(smem_addr(dk + off), src.k, kv < kr.n_kv);
      cp_async16(smem_addr(dv + off), src.v, kv < kr.n_kv);
    }
    if (tid < BN) sok[stage * BN + tid] = key_allowed(p, kr, b, kv0 + tid);
  };

  // The first kStages - 1 key tiles, a commit group each (empty past the last tile: one group per tile throughout, so
  // waiting for all but the newest kStages - 2 groups means waiting for the tile about to be multiplied).
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < tile_hi - tile_lo) load_tile(tile_lo + i, i);
    cp_async_commit();
  }

  // Q fragments of this warp's 16 rows x 128-wide slice stay in registers for the whole key loop.
  const int row0 = q0 + rg * 16 + gq, row1 = row0 + 8;
  uint32_t qf[kQSteps][4];
  {
    const __nv_bfloat16* qb = p.q + b * p.q_sb + h * p.q_sh;
    const __nv_bfloat16* q_r0 = qb + int64_t(row0) * p.q_st;
    const __nv_bfloat16* q_r1 = qb + int64_t(row1) * p.q_st;
#pragma unroll
    for (int kk = 0; kk < kQSteps; ++kk) {
      const int d = slice * kAttentionSliceDim + kk * 16 + 2 * tq;
      qf[kk][0] = row0 < p.t ? load_b32(q_r0 + d) : 0u;
      qf[kk][1] = row1 < p.t ? load_b32(q_r1 + d) : 0u;
      qf[kk][2] = row0 < p.t ? load_b32(q_r0 + d + 8) : 0u;
      qf[kk][3] = row1 < p.t ? load_b32(q_r1 + d + 8) : 0u;
    }
  }

  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int mi = lane >> 3, ri = lane & 7;  // ldmatrix: which 8x8 matrix / row this lane addresses

  int stage = 0;  // (tile - tile_lo) % kStages
  for (int tile = tile_lo; tile < tile_hi; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` is visible; everyone is done with the previous tile's stage and with ss
    if (kStages - 1 < tile_hi - tile) load_tile(tile + kStages - 1, stage == 0 ? kStages - 1 : stage - 1);
    cp_async_commit();

    // S = Q K^T over this warp's slice of the head dim.
    float s[NTS][4];
#pragma unroll
    for (int i = 0; i < NTS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    const __nv_bfloat16* kt = sk + stage * S::kTileElems;
#pragma unroll
    for (int kk = 0; kk < kQSteps; ++kk) {
      const int ch = slice * kSliceChunks + kk * 2 + (mi & 1);
#pragma unroll
      for (int nt = 0; nt < NTS; nt += 2) {
        const int row = nt * 8 + (mi >> 1) * 8 + ri;
        uint32_t r[4];
        ldmatrix_x4(r, smem_addr(kt + tile_offset<D>(row, ch)));
        mma_bf16_16816(s[nt], qf[kk], r[0], r[1]);
        mma_bf16_16816(s[nt + 1], qf[kk], r[2], r[3]);
      }
    }
    if constexpr (NS > 1) {
      // Sum the slices' partial scores in a fixed order, so every warp of a row group gets identical S.
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) ss[(warp * NTS + nt) * 32 + lane] = make_float4(s[nt][0], s[nt][1], s[nt][2], s[nt][3]);
      __syncthreads();
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        float4 acc = ss[((rg * NS) * NTS + nt) * 32 + lane];
#pragma unroll
        for (int j = 1; j < NS; ++j) {
          const float4 v = ss[((rg * NS + j) * NTS + nt) * 32 + lane];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        }
        s[nt][0] = acc.x;
        s[nt][1] = acc.y;
        s[nt][2] = acc.z;
        s[nt][3] = acc.w;
      }
    }

    const int kv0 = tile * BN;
    const bool need_mask = kv0 + BN > kr.n_kv || p.valid != nullptr ||
                           (p.causal && (kv0 + BN - 1 > kr.n_prefix + q0 ||
                                         (p.window > 0 && kv0 <= kr.n_prefix + q0 + BM - 1 - p.window)));
    if (need_mask) {
      const int* ok = sok + stage * BN;
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = nt * 8 + 2 * tq + (e & 1);
          const int kv = kv0 + n;
          const int last = kr.n_prefix + ((e >> 1) ? row1 : row0);  // last key index the row may see
          bool keep = ok[n] != 0;
          if (p.causal) keep = keep && kv <= last && (p.window == 0 || kv > last - p.window);
          if (!keep) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax (fp32, base-2 exponentials). Rows are spread over the 4 lanes of a quad.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float ms[2], alpha[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      ms[i] = mx[i] == -INFINITY ? 0.f : mx[i] * kLog2e;  // fully masked so far: keep exp2 finite
      alpha[i] = exp2f(fmaf(m[i], kLog2e, -ms[i]));
      m[i] = mx[i];
    }
#pragma unroll
    for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(fmaf(s[nt][e], kLog2e, -ms[e >> 1]));
        rowsum[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + rowsum[i];
#pragma unroll
    for (int nd = 0; nd < kOTiles; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }

    // O += P V over this warp's slice; P is rounded to bf16 as the A operand.
    const __nv_bfloat16* vt = sv + stage * S::kTileElems;
#pragma unroll
    for (int ks = 0; ks < BN / 16; ++ks) {
      const uint32_t a[4] = {pack_bf16x2(s[2 * ks][0], s[2 * ks][1]), pack_bf16x2(s[2 * ks][2], s[2 * ks][3]),
                             pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      const int row = ks * 16 + (mi & 1) * 8 + ri;
#pragma unroll
      for (int nd = 0; nd < kOTiles; nd += 2) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, smem_addr(vt + tile_offset<D>(row, slice * kSliceChunks + nd + (mi >> 1))));
        mma_bf16_16816(o[nd], a, r[0], r[1]);
        mma_bf16_16816(o[nd + 1], a, r[2], r[3]);
      }
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  // A row that saw no key (padding, or an empty split) has l == 0: output 0, lse -inf.
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
  const int rows[2] = {row0, row1};
  if (p.num_splits == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (rows[i] >= p.t) continue;
      __nv_bfloat16* orow = p.out + b * p.o_sb + int64_t(rows[i]) * p.o_st + h * p.o_sh;
#pragma unroll
      for (int nd = 0; nd < kOTiles; ++nd) {
        const int d = slice * kAttentionSliceDim + nd * 8 + 2 * tq;
        *reinterpret_cast<__nv_bfloat162*>(orow + d) =
            __floats2bfloat162_rn(o[nd][2 * i] * inv[i], o[nd][2 * i + 1] * inv[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (rows[i] >= p.t) continue;
      const int64_t prow = ((int64_t(split) * p.batch + b) * p.hq + h) * p.t + rows[i];
      float* orow = p.part_o + prow * D;
#pragma unroll
      for (int nd = 0; nd < kOTiles; ++nd) {
        const int d = slice * kAttentionSliceDim + nd * 8 + 2 * tq;
        *reinterpret_cast<float2*>(orow + d) = make_float2(o[nd][2 * i] * inv[i], o[nd][2 * i + 1] * inv[i]);
      }
      if (slice == 0 && tq == 0) p.part_lse[prow] = l[i] > 0.f ? m[i] + logf(l[i]) : -INFINITY;
    }
    if (last_split_to_arrive(p.split_counters + (int64_t(b) * p.hq + h) * gridDim.x + blockIdx.x, p.num_splits)) {
      const int rows = min(BM, p.t - q0);
      // The K/V tiles are free now (no copy or read of them is in flight): the combine's shared memory.
      if (combine_smem_floats(rows, p.num_splits) * int64_t(sizeof(float)) <= kStages * 2 * S::kTileElems * 2)
        combine_split_rows<D>(p, b, rows, [&](int r) { return CombineRow{h, q0 + r}; }, reinterpret_cast<float*>(smem));
      else
        combine_splits<D>(p, b, h, q0, rows);
    }
  }
}

}  // namespace attention_detail

// Launches the attention (with num_splits > 1, the splits combine themselves). The launcher has validated `p`.
template <int D>
cudaError_t attention_bf16(const AttentionParams& p, cudaStream_t stream) {
  using S = attention_detail::Shape<D>;
  if (p.t <= 0 || p.batch <= 0) return cudaSuccess;
  const dim3 grid((p.t + S::kBlockM - 1) / S::kBlockM, p.hq, p.batch * p.num_splits);
  if (p.stages == 3)
    return launch_kernel_smem<attention_detail::attention_fwd_kernel<D, 3>>(grid, kAttentionThreads, S::smem_bytes(3),
                                                                            stream, p);
  return launch_kernel_smem<attention_detail::attention_fwd_kernel<D, 2>>(grid, kAttentionThreads, S::smem_bytes(2),
                                                                          stream, p);
}

}  // namespace dgemma::kernels
