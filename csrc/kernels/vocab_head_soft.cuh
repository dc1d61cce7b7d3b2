// Pass 2 of the fused vocabulary head: the self-conditioning input softmax(z)·E·scale [rows, dim].
// The statistics pass stored q = exp(z − m_c) in bf16 with one fp32 maximum m_c per (row, 64-column
// chunk); here each k slice of 64 vocab ids is one chunk, so its A fragments are rescaled in registers
// by exp(m_c − lse) into bf16 probabilities (the reference also rounds them to bf16) before the MMA.
// The vocabulary is split across CTAs (split-K); the fp32 partial sums are reduced in a fixed order by
// a second kernel, which applies the scale and rounds once to bf16. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pdl.cuh"
#include "kernels/vocab_head_mma.cuh"
#include "kernels/vocab_head_params.cuh"

namespace dgemma::kernels::vocab_head {

__global__ void __launch_bounds__(kThreads, 1) vocab_head_soft_kernel(const VocabHeadParams p,
                                                                       const VocabHeadLayout l) {
  pdl_begin();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* s_a = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kStages][kBM][kBK] probabilities
  __nv_bfloat16* s_b = s_a + kStages * kBM * kBK;                    // [kStages][kBK][kBN] embedding rows
  float* s_m = reinterpret_cast<float*>(s_b + kStages * kBK * kBN);   // [kStages][kBM] chunk maxima

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int g = lane >> 2, q = lane & 3;
  const int64_t rows = l.rows;
  const int n0 = static_cast<int>(blockIdx.x) * kBN;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int k_slices = static_cast<int>(l.vocab_pad / kBK);
  const int per_split = static_cast<int>(ceil_div(k_slices, p.soft_splits));
  const int ks_begin = static_cast<int>(blockIdx.z) * per_split;
  const int total = max(0, min(k_slices, ks_begin + per_split) - ks_begin);

  const unsigned char* ws = static_cast<const unsigned char*>(p.workspace);
  const __nv_bfloat16* probs = reinterpret_cast<const __nv_bfloat16*>(ws + l.probs);
  const float* chunk_max = reinterpret_cast<const float*>(ws + l.chunk_max);
  float* partial = reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + l.soft_partial) +
                   static_cast<int64_t>(blockIdx.z) * rows * p.dim;

  auto load_stage = [&](int it) {
    const int stage = it % kStages;
    const int64_t v0 = static_cast<int64_t>(ks_begin + it) * kBK;
    __nv_bfloat16* a = s_a + stage * kBM * kBK;
    __nv_bfloat16* b = s_b + stage * kBK * kBN;
#pragma unroll
    for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
      const int r = c >> 3, ch = c & 7;
      const int64_t grow = row0 + r;
      const bool row_ok = grow < rows;
      cp_async_16(a + r * kBK + swizzle_chunk(r, ch) * 8, probs + (row_ok ? grow : 0) * l.vocab_pad + v0 + ch * 8,
                  row_ok ? 16 : 0);
    }
#pragma unroll
    for (int c = tid; c < kBK * (kBN / 8); c += kThreads) {
      const int r = c >> 4, ch = c & 15;
      const int64_t v = v0 + r;
      const int col = n0 + ch * 8;
      const bool ok = v < p.vocab && col < p.dim;
      cp_async_16(b + r * kBN + swizzle_chunk(r, ch) * 8, p.embed + (ok ? v * p.dim + col : 0), ok ? 16 : 0);
    }
    if (tid < kBM / 4) {
      const int64_t r = row0 + tid * 4;
      const int64_t valid = rows - r;
      const int bytes = valid >= 4 ? 16 : (valid > 0 ? static_cast<int>(valid) * 4 : 0);
      cp_async_16(s_m + stage * kBM + tid * 4, chunk_max + (v0 / kChunk) * l.rows_pad + (bytes > 0 ? r : 0), bytes);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nj = 0; nj < 8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

  // Rows past the end get lse = +inf, hence scale 0 (their q and maxima are zero-filled).
  float lse[4];
#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    const int64_t grow = row0 + warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
    lse[slot] = grow < rows ? p.lse[grow] : INFINITY;
  }

  auto compute_stage = [&](int stage) {
    const __nv_bfloat16* a = s_a + stage * kBM * kBK;
    const __nv_bfloat16* b = s_b + stage * kBK * kBN;
    float scale[4];
#pragma unroll
    for (int slot = 0; slot < 4; ++slot) {
      const int r = warp_m * kWarpM + (slot >> 1) * 16 + g + 8 * (slot & 1);
      scale[slot] = __expf(s_m[stage * kBM + r] - lse[slot]);
    }
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = warp_m * kWarpM + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], a + r * kBK + swizzle_chunk(r, kk * 2 + (lane >> 4)) * 8);
        // a0/a2 hold row g of this m16 tile, a1/a3 row g + 8.
        af[mi][0] = scale_bf16x2(af[mi][0], scale[2 * mi]);
        af[mi][1] = scale_bf16x2(af[mi][1], scale[2 * mi + 1]);
        af[mi][2] = scale_bf16x2(af[mi][2], scale[2 * mi]);
        af[mi][3] = scale_bf16x2(af[mi][3], scale[2 * mi + 1]);
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        uint32_t bf[4];
        const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int ch = (warp_n * kWarpN + nj * 16) / 8 + (lane >> 4);
        ldmatrix_x4_trans(bf, b + r * kBN + swizzle_chunk(r, ch) * 8);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_bf16_16816(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
          mma_bf16_16816(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
        }
      }
    }
  };

  cp_async_pipeline<kStages>(total, load_stage, compute_stage, [](int) {});

#pragma unroll
  for (int slot = 0; slot < 4; ++slot) {
    const int mi = slot >> 1, half = slot & 1;
    const int64_t grow = row0 + warp_m * kWarpM + mi * 16 + g + 8 * half;
    if (grow >= rows) continue;
#pragma unroll
    for (int nj = 0; nj < 8; ++nj) {
      const int col = n0 + warp_n * kWarpN + nj * 8 + 2 * q;
      if (col < p.dim)
        *reinterpret_cast<float2*>(partial + grow * p.dim + col) =
            make_float2(acc[mi][nj][2 * half], acc[mi][nj][2 * half + 1]);
    }
  }
}

// soft[i] = bf16(scale · Σ_split partial[split][i]), summed in split order; four elements per thread.
__global__ void vocab_head_soft_reduce_kernel(const VocabHeadParams p, const VocabHeadLayout l) {
  pdl_begin();
  const int64_t n = l.rows * p.dim;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  const float* partial =
      reinterpret_cast<const float*>(static_cast<const unsigned char*>(p.workspace) + l.soft_partial);
  float4 sum = *reinterpret_cast<const float4*>(partial + i);
  for (int s = 1; s < p.soft_splits; ++s) {
    const float4 x = *reinterpret_cast<const float4*>(partial + s * n + i);
    sum.x += x.x;
    sum.y += x.y;
    sum.z += x.z;
    sum.w += x.w;
  }
  uint2 out;
  out.x = pack_bf16x2(sum.x * p.soft_scale, sum.y * p.soft_scale);
  out.y = pack_bf16x2(sum.z * p.soft_scale, sum.w * p.soft_scale);
  *reinterpret_cast<uint2*>(p.soft + i) = out;
}

}  // namespace dgemma::kernels::vocab_head
