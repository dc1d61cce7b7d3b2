// The middle of an FP8 MLP or expert, between its two GEMMs:
//   gelu_up_quantize:   h[r, c] = gelu_tanh(gate) * up, gate/up from D's two halves, then the per-row FP8
//                       quantisation of h for the next GEMM. D is the unscaled grouped GEMM output
//                       (sm90_fp8_grouped_gemm.cuh; the per-token activation scale and the per-channel weight
//                       scales are applied here) or already scaled (sm90_fp8_scaled_gemm.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8_quant.cuh"
#include "kernels/pdl.cuh"

namespace dgemma::kernels {

__device__ __forceinline__ float gelu_tanh(float x) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the "gelu_pytorch_tanh" of the model.
  const float inner = 0.7978845608028654f * fmaf(0.044715f * x, x * x, x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

// 8 values rounded to bf16 and packed for one 16-byte store.
__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return raw;
}

__device__ __forceinline__ void store_bf16x8(__nv_bfloat16* p, const float (&v)[8]) {
  *reinterpret_cast<uint4*>(p) = pack_bf16x8(v);
}

constexpr int kEpilogueThreads = 128;

// Where gate_up_quantize finds each row's weight scales: row r belongs to group e = row_group[r]
// (0 when row_group is null); its gate scales are gate_scale + e * group_stride, its up scales
// up_scale + e * group_stride. Rows r >= *valid_rows (when given) are skipped. With gate_scale null, D is already
// scaled (sm90_fp8_scaled_gemm's epilogue applied both scales; a_scale is then unused): h = gelu_tanh(gate) * up.
// With row_src and row_weight (a padded plan's row -> token * top_k + slot, -1 for padding; the routing weights),
// the stored h_scale[r] is the quantisation scale times row_weight[row_src[r]] (0 for padding): the next GEMM's
// epilogue then applies the routing weight with the scale. row_src counts `slots` entries per token and row_weight
// `top_k` (0: slots): a slot from top_k on (a shared expert, moe_dispatch.cuh PlanIds) has weight 1.
struct GeluUpScales {
  const float* gate_scale;
  const float* up_scale;
  int64_t group_stride;
  const int* row_group;
  const int* valid_rows;
  const int* row_src = nullptr;
  const float* row_weight = nullptr;
  int slots = 1;
  int top_k = 0;
};

constexpr int kGeluUpMaxVecs = 4;
constexpr int kGeluUpMaxInter = kEpilogueThreads * kGeluUpMaxVecs * 8;  // 4096
// Rows up to kGeluUpWarpMaxInter (the experts' 704) go one warp per row, kGeluUpWarpRows rows per block: a block per
// row of ~90 vectors leaves most of its threads idle and the launch spends its time scheduling thousands of blocks.
constexpr int kGeluUpWarpVecs = 4;
constexpr int kGeluUpWarpMaxInter = 32 * kGeluUpWarpVecs * 8;  // 1024
constexpr int kGeluUpWarpRows = 8;

// Row r of gelu_up_quantize by kThreads threads (t: this thread's index among them; kVecs 8-element vectors each);
// row_max(v): the maximum of v over the kThreads threads (every one of them gets it). Each element's arithmetic is
// the same whatever the split, and a maximum is exact in any order: both kernels below store the same bytes.
template <int kThreads, int kVecs, typename RowMax>
__device__ __forceinline__ void gelu_up_quantize_row(const __nv_bfloat16* __restrict__ d,
                                                     const float* __restrict__ a_scale, int inter,
                                                     const GeluUpScales& s, uint8_t* __restrict__ h_q,
                                                     float* __restrict__ h_scale, int64_t r, int t, RowMax&& row_max) {
  const bool prescaled = s.gate_scale == nullptr;
  const int64_t e = s.row_group ? s.row_group[r] : 0;
  const float* gs = prescaled ? nullptr : s.gate_scale + e * s.group_stride;
  const float* us = prescaled ? nullptr : s.up_scale + e * s.group_stride;
  const __nv_bfloat16* dr = d + r * 2 * static_cast<int64_t>(inter);
  const float as = prescaled ? 1.f : a_scale[r];
  const int vecs = inter / 8;
  float h[kVecs][8];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int c = 8 * (t + j * kThreads);
    if (c < 8 * vecs) {
      float g[8], u[8];
      load_bf16x8(dr + c, g);
      load_bf16x8(dr + inter + c, u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        h[j][i] = prescaled ? gelu_tanh(g[i]) * u[i] : gelu_tanh(g[i] * as * gs[c + i]) * (u[i] * as * us[c + i]);
        amax = fmaxf(amax, fabsf(h[j][i]));
      }
    }
  }
  const float sc = fp8_scale_from_amax(row_max(amax));
  uint8_t* qr = h_q + r * inter;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int c = 8 * (t + j * kThreads);
    if (c < 8 * vecs) *reinterpret_cast<uint2*>(qr + c) = fp8x8(h[j], sc);
  }
  if (t == 0) {
    float stored = sc;
    if (s.row_weight != nullptr) {
      const int src = s.row_src[r];
      if (src < 0) {
        stored = 0.f;
      } else if (s.top_k == 0) {
        stored = sc * s.row_weight[src];
      } else {
        const int slot = src % s.slots;
        stored = slot < s.top_k ? sc * s.row_weight[src / s.slots * s.top_k + slot] : sc;
      }
    }
    h_scale[r] = stored;
  }
}

// One block per row. d [rows, 2 * inter] bf16: gate in columns [0, inter), up in [inter, 2 * inter).
// h_q [rows, inter] fp8 and h_scale [rows]. inter % 8 == 0, inter <= kGeluUpMaxInter.
static __global__ void __launch_bounds__(kEpilogueThreads)
    gelu_up_quantize_kernel(const __nv_bfloat16* __restrict__ d, const float* __restrict__ a_scale, int inter,
                            GeluUpScales s, uint8_t* __restrict__ h_q, float* __restrict__ h_scale) {
  pdl_begin();
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  if (s.valid_rows != nullptr && r >= *s.valid_rows) return;  // uniform per block
  gelu_up_quantize_row<kEpilogueThreads, kGeluUpMaxVecs>(d, a_scale, inter, s, h_q, h_scale, r, threadIdx.x,
                                                          [&](float v) { return block_max(v, red); });
}

// One warp per row (inter <= kGeluUpWarpMaxInter), kGeluUpWarpRows rows per block.
static __global__ void __launch_bounds__(kGeluUpWarpRows * 32)
    gelu_up_quantize_warp_kernel(const __nv_bfloat16* __restrict__ d, const float* __restrict__ a_scale, int64_t rows,
                                 int inter, GeluUpScales s, uint8_t* __restrict__ h_q, float* __restrict__ h_scale) {
  pdl_begin();
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGeluUpWarpRows + (threadIdx.x >> 5);
  if (r >= rows || (s.valid_rows != nullptr && r >= *s.valid_rows)) return;  // uniform per warp
  gelu_up_quantize_row<32, kGeluUpWarpVecs>(d, a_scale, inter, s, h_q, h_scale, r, threadIdx.x & 31,
                                            [](float v) { return warp_max(v); });
}

inline cudaError_t gelu_up_quantize(const __nv_bfloat16* d, const float* a_scale, int64_t rows, int inter,
                                    const GeluUpScales& s, uint8_t* h_q, float* h_scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (inter <= kGeluUpWarpMaxInter) {
    const int64_t blocks = (rows + kGeluUpWarpRows - 1) / kGeluUpWarpRows;
    return launch_kernel(gelu_up_quantize_warp_kernel, static_cast<unsigned>(blocks), kGeluUpWarpRows * 32, 0, stream,
                         d, a_scale, rows, inter, s, h_q, h_scale);
  }
  return launch_kernel(gelu_up_quantize_kernel, static_cast<unsigned>(rows), kEpilogueThreads, 0, stream, d, a_scale,
                       inter, s, h_q, h_scale);
}

}  // namespace dgemma::kernels
