// FP8 E4M3 quantisation helpers and the per-token (per-row) activation quantiser.
//
// Scheme (python/dgemma/quant.py is the reference, bit for bit):
//   scale = max(amax(row), kFp8MinAmax) / 448   (fp32)
//   q     = e4m3(clamp(x / scale, -448, 448))   (round to nearest even, IEEE division)
// Weights use the same formula per output channel; dequantised values are float(q) * scale.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pdl.cuh"

namespace dgemma::kernels {

constexpr float kFp8Max = 448.0f;
// NOTE: keeps the scale of an all-zero row finite (x / scale is then 0); any non-zero bf16 activation
// row has a far larger amax.
constexpr float kFp8MinAmax = 1e-12f;

__device__ __forceinline__ float fp8_scale_from_amax(float amax) { return fmaxf(amax, kFp8MinAmax) / kFp8Max; }

// IEEE division (not a reciprocal multiply) so the result matches torch's `x / scale` exactly.
__device__ __forceinline__ uint8_t fp8_quantize(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max over all threads (blockDim.x a multiple of 32, at most 1024). Every thread gets it.
__device__ __forceinline__ float block_max(float v, float* smem32) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // smem32 may still be read by a previous call
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  v = lane < warps ? smem32[lane] : 0.f;
  return warp_max(v);
}

// 8 bf16 values held in 16 bytes, as floats.
__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// 8 bf16 values from a 16-byte aligned address.
__device__ __forceinline__ void load_bf16x8(const __nv_bfloat16* p, float (&v)[8]) {
  unpack_bf16x8(*reinterpret_cast<const uint4*>(p), v);
}

__device__ __forceinline__ uint2 fp8x8(const float (&v)[8], float scale) {
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i / 4] |= static_cast<uint32_t>(fp8_quantize(v[i], scale)) << (8 * (i % 4));
  return make_uint2(w[0], w[1]);
}

// One block per row: x [rows, cols] bf16 (row stride x_stride) -> q [rows, cols] fp8, scale [rows].
// cols % 8 == 0 and 16-byte aligned rows;
// cols <= kQuantMaxCols.
constexpr int kQuantThreads = 256;
constexpr int kQuantMaxVecs = 4;
constexpr int kQuantMaxCols = kQuantThreads * kQuantMaxVecs * 8;  // 8192: o_proj of full-attention layers
static __global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_stride, int cols, uint8_t* __restrict__ q,
                         float* __restrict__ scale) {
  pdl_begin();
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * x_stride;
  float v[kQuantMaxVecs][8];
  float amax = 0.f;
  const int vecs = cols / 8;
#pragma unroll
  for (int j = 0; j < kQuantMaxVecs; ++j) {
    const int c = (threadIdx.x + j * kQuantThreads);
    if (c < vecs) {
      load_bf16x8(xr + 8 * c, v[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[j][i]));
    }
  }
  const float s = fp8_scale_from_amax(block_max(amax, red));
  uint8_t* qr = q + row * cols;
#pragma unroll
  for (int j = 0; j < kQuantMaxVecs; ++j) {
    const int c = (threadIdx.x + j * kQuantThreads);
    if (c < vecs) *reinterpret_cast<uint2*>(qr + 8 * c) = fp8x8(v[j], s);
  }
  if (threadIdx.x == 0) scale[row] = s;
}

inline cudaError_t quantize_rows(const __nv_bfloat16* x, int64_t x_stride, int64_t rows, int cols, uint8_t* q,
                                 float* scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return launch_kernel(quantize_rows_kernel, static_cast<unsigned>(rows), kQuantThreads, 0, stream, x, x_stride,
                       cols, q, scale);
}

}  // namespace dgemma::kernels
