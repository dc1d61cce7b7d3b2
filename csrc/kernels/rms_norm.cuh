// RMSNorm over the last dimension: y = x * (mean(x^2) + eps)^-1/2 [* w], computed in fp32 and
// rounded once to the output type. Covers the model's three variants: weighted (layer norms,
// q/k norms), weightless (v_norm, router norm, self-conditioning post-norm) via weight == nullptr.
// rms_norm_fp8 fuses the norm with the per-row FP8 quantisation of the following GEMM's input.
// Torch-free: raw pointers and a stream; the launcher in csrc/ops validates every argument.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/fp8_quant.cuh"
#include "kernels/pdl.cuh"

namespace dgemma::kernels {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// NOTE: one warp per row. Rows are short (head_dim 256/512, hidden 2816), so a warp covers a row
// in at most ~90 elements per lane; the second pass re-reads the row from L1.
constexpr int kRmsNormWarpsPerBlock = 4;

// A warp's pass over R rows: in each row, lane l visits elements l, l + 32, l + 64, ... < dim, in that order, calling
// use(r, i, value(r, i)). B visits of each row at a time: every value of a batch (its loads) comes before any use (a
// sum, a store), so a warp keeps R * B loads in flight rather than one. One warp per row leaves little else to hide
// the latency (256 rows: two warps per multiprocessor); the order of each row's visits, so every fp32 sum, is the
// plain loop's.
constexpr int kRowBatch = 4;
// bf16 rows: 8 (the fp32 residual kernel spills at 8).
template <typename T>
constexpr int kRowBatchOf = sizeof(T) == 2 ? 8 : 4;

template <int R, int B = kRowBatch, typename Value, typename Use>
__device__ __forceinline__ void for_rows_elements(int dim, int lane, Value&& value, Use&& use) {
  for (int base = lane; base < dim; base += 32 * B) {
    float v[R][B];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < B; ++j) {
        const int i = base + 32 * j;
        v[r][j] = i < dim ? value(r, i) : 0.f;
      }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < B; ++j) {
        const int i = base + 32 * j;
        if (i < dim) use(r, i, v[r][j]);
      }
  }
}

// for_rows_elements of one row: value(i), use(i, v).
template <int B = kRowBatch, typename Value, typename Use>
__device__ __forceinline__ void for_row_elements(int dim, int lane, Value&& value, Use&& use) {
  for_rows_elements<1, B>(
      dim, lane, [&](int, int i) { return value(i); }, [&](int, int i, float v) { use(i, v); });
}

// 1 / rms of one row for the calling warp (every lane gets it). Shared by both kernels below, so a norm
// followed by a quantisation sees exactly the values the plain norm writes.
template <typename T>
__device__ __forceinline__ float row_inv_rms(const T* __restrict__ xr, int dim, float eps, int lane) {
  float sum_sq = 0.f;
  for_row_elements<kRowBatchOf<T>>(dim, lane, [&](int i) { return to_float(xr[i]); },
                   [&](int, float v) { sum_sq = fmaf(v, v, sum_sq); });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  // Same formula as the reference: (mean + eps)^-0.5, not rsqrt of a differently rounded value.
  return rsqrtf(sum_sq / static_cast<float>(dim) + eps);
}

// The normed value of element i holding f, rounded to T (the value rms_norm_kernel stores).
template <typename T>
__device__ __forceinline__ T normed_value(float f, const T* __restrict__ weight, int i, float inv_rms) {
  float v = f * inv_rms;
  if (weight != nullptr) v *= to_float(weight[i]);
  return from_float<T>(v);
}

// Element i of the normed row, rounded to T.
template <typename T>
__device__ __forceinline__ T normed(const T* __restrict__ xr, const T* __restrict__ weight, int i, float inv_rms) {
  return normed_value(to_float(xr[i]), weight, i, inv_rms);
}

template <typename T>
__global__ void __launch_bounds__(kRmsNormWarpsPerBlock * 32)
    rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y, int64_t rows,
                    int dim, int64_t x_row_stride, int64_t y_row_stride, float eps) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRmsNormWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * x_row_stride;
  T* yr = y + row * y_row_stride;
  const float inv_rms = row_inv_rms(xr, dim, eps, lane);
  for_row_elements<kRowBatchOf<T>>(dim, lane, [&](int i) { return to_float(normed(xr, weight, i, inv_rms)); },
                   [&](int i, float v) { yr[i] = from_float<T>(v); });  // v is a T value: stored exactly
}

// The input of an FP8 GEMM in one pass: y = rms_norm(x) [* w] rounded to bf16 as rms_norm_kernel rounds it,
// then quantised per row as quantize_rows_kernel does (fp8_quant.cuh): scale = max(amax(y), min) / 448,
// q = e4m3(y / scale). Bit-identical to the two kernels in a row, without the bf16 round trip through memory.
// q [rows, dim] is contiguous; scale [rows].
static __global__ void __launch_bounds__(kRmsNormWarpsPerBlock * 32)
    rms_norm_fp8_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ weight,
                        uint8_t* __restrict__ q, float* __restrict__ scale, int64_t rows, int dim,
                        int64_t x_row_stride, float eps) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRmsNormWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const __nv_bfloat16* xr = x + row * x_row_stride;
  const float inv_rms = row_inv_rms(xr, dim, eps, lane);
  float amax = 0.f;
  auto normed_at = [&](int i) { return __bfloat162float(normed(xr, weight, i, inv_rms)); };
  constexpr int kB = kRowBatchOf<__nv_bfloat16>;
  for_row_elements<kB>(dim, lane, normed_at, [&](int, float v) { amax = fmaxf(amax, fabsf(v)); });
  const float s = fp8_scale_from_amax(warp_max(amax));
  uint8_t* qr = q + row * static_cast<int64_t>(dim);
  for_row_elements<kB>(dim, lane, normed_at, [&](int i, float v) { qr[i] = fp8_quantize(v, s); });
  if (lane == 0) scale[row] = s;
}

template <typename T>
cudaError_t rms_norm(const T* x, const T* weight, T* y, int64_t rows, int dim, int64_t x_row_stride,
                     int64_t y_row_stride, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRmsNormWarpsPerBlock - 1) / kRmsNormWarpsPerBlock;
  return launch_kernel(rms_norm_kernel<T>, static_cast<unsigned>(blocks), kRmsNormWarpsPerBlock * 32, 0, stream, x,
                       weight, y, rows, dim, x_row_stride, y_row_stride, eps);
}

inline cudaError_t rms_norm_fp8(const __nv_bfloat16* x, const __nv_bfloat16* weight, uint8_t* q, float* scale,
                                int64_t rows, int dim, int64_t x_row_stride, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRmsNormWarpsPerBlock - 1) / kRmsNormWarpsPerBlock;
  return launch_kernel(rms_norm_fp8_kernel, static_cast<unsigned>(blocks), kRmsNormWarpsPerBlock * 32, 0, stream, x,
                       weight, q, scale, rows, dim, x_row_stride, eps);
}

}  // namespace dgemma::kernels
