// The residual updates of a decoder/encoder layer in one pass each, rounded exactly as the reference's
// chain of ops (python/dgemma/ops/reference.py `add_rms_norm`, `ffn_residual`), for T = float or bf16:
//   add_rms_norm:  out = T(x + T(norm(y) * w))
//   ffn_residual:  s   = T(T(norm(a) * wa) + T(norm(b) * wb))
//                  out = T(T(x + T(norm(s) * wc)) * scalar)
// where norm(v) = v * (mean(v^2) + eps)^-1/2 in fp32 (the rms_norm kernel's formula). One warp per row;
// a row is re-read from L1 in each pass (hidden 2816: ~90 elements per lane). Products and sums use the
// _rn intrinsics so that no multiply-add is contracted past a rounding the reference makes (fp32 rows).
// Either form can also write the FP8 input of the GEMM after the next norm (add_rms_norm: the dense MLP's;
// ffn_residual: the next layer's q/k/v projection).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernels/residual_norm_limits.h"
#include "kernels/fp8_epilogue.cuh"
#include "kernels/fp8_quant.cuh"
#include "kernels/pdl.cuh"
#include "kernels/rms_norm.cuh"

namespace dgemma::kernels {

template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<T>(v));
}

__device__ __forceinline__ float warp_total(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The next FP8 GEMM's input from the output (bf16 only): q [rows, dim] and scale [rows] quantise
// rms_norm(out) [* weight] exactly as rms_norm_fp8_kernel would from the stored out (same reduction order).
template <typename T>
struct ResidualQuant {
  const T* weight = nullptr;
  uint8_t* q = nullptr;  // null: no quantised output
  float* scale = nullptr;
};

// Stores a row (out_at(i): the value of element i, as rounded to T) and, when quant.q is set (bf16), quantises
// rms_norm(row) [* quant.weight] per row for the next FP8 GEMM. The sum of squares runs over the stored values
// in row_inv_rms's order and the quantising passes recompute the values (never reading out back), so the
// result equals rms_norm_fp8 of the stored row bit for bit.
template <typename T, typename OutAt>
__device__ __forceinline__ void store_and_quantize(OutAt&& out_at, T* __restrict__ outr, int dim, float eps, int lane,
                                                   int64_t row, const ResidualQuant<T>& quant) {
  float ss = 0.f;
  for_row_elements<kRowBatchOf<T>>(dim, lane, out_at, [&](int i, float f) {
    outr[i] = from_float<T>(f);
    ss = fmaf(f, f, ss);
  });
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (quant.q != nullptr) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
      const float inv_rms = rsqrtf(ss / static_cast<float>(dim) + eps);
      auto normed_at = [&](int i) { return __bfloat162float(normed_value(out_at(i), quant.weight, i, inv_rms)); };
      float amax = 0.f;
      for_row_elements<kRowBatchOf<T>>(dim, lane, normed_at,
                                       [&](int, float v) { amax = fmaxf(amax, fabsf(v)); });
      const float s = fp8_scale_from_amax(warp_max(amax));
      uint8_t* qr = quant.q + row * static_cast<int64_t>(dim);
      for_row_elements<kRowBatchOf<T>>(dim, lane, normed_at,
                                       [&](int i, float v) { qr[i] = fp8_quantize(v, s); });
      if (lane == 0) quant.scale[row] = s;
    }
  }
}

// Element i of add_rms_norm's output, x + rms_norm(a) * wa with a's inverse rms ra, each step rounded to T as the
// reference rounds it (returned as float: the stored value).
// add_norm_of: the same of one element's values x, a, wa (wherever they were read from).
template <typename T>
__device__ __forceinline__ float add_norm_of(float x, float a, float wa, float ra) {
  const float n = rounded<T>(__fmul_rn(__fmul_rn(a, ra), wa));
  return to_float(from_float<T>(__fadd_rn(x, n)));
}

template <typename T>
__device__ __forceinline__ float add_norm_value(const T* __restrict__ xr, const T* __restrict__ ar,
                                                const T* __restrict__ wa, float ra, int i) {
  return add_norm_of<T>(to_float(xr[i]), to_float(ar[i]), to_float(wa[i]), ra);
}

// Requests the 128-byte lines of a row of `dim` elements into L1 without waiting for them (prefetch.global.L1), one
// warp's lanes taking every 32nd line: the passes that read the row later find it there rather than each waiting
// on L2 or memory for its first batch. Null: nothing.
template <typename T>
__device__ __forceinline__ void prefetch_row_l1(const T* row, int dim, int lane) {
  if (row == nullptr) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{127};
  const uintptr_t end = reinterpret_cast<uintptr_t>(row + dim);
  for (uintptr_t line = first + uintptr_t(lane) * 128; line < end; line += 32 * 128)
    asm volatile("prefetch.global.L1 [%0];" ::"l"(__cvta_generic_to_global(reinterpret_cast<const void*>(line))));
}

// The feed-forward branches straight from the expert pipeline, before its combine (moe_dispatch.cuh, the shared
// experts' layout): `down` [*, dim] bf16 holds each (token, slot) row's scaled and weighted output and row_of
// [rows, slots] its row (-1: none). Row t of the dense MLP's branch (the kernel's `a`) is the sum of slots
// [top_k, slots), of the experts' branch (`b`) the sum of slots [0, top_k), each in slot order in fp32 rounded once
// to bf16: the values moe_combine_kernel would store. dim % 8 == 0, 16-byte aligned rows.
struct ExpertBranches {
  const __nv_bfloat16* down = nullptr;
  const int32_t* row_of = nullptr;
  int slots = 0;
  int top_k = 0;
};

// Dynamic shared memory of the residual kernel with expert branches: both branch rows of each warp, in bf16.
inline size_t expert_branches_smem_bytes(int dim) {
  return static_cast<size_t>(kRmsNormWarpsPerBlock) * 2 * static_cast<size_t>(dim) * sizeof(__nv_bfloat16);
}

// Slots whose rows a lane loads together in gather_expert_branches (their loads in flight at once): the model's 8
// routed and 3 shared-expert slots in one batch; and the column chunks a lane gathers at once: 2 (its 11 chunks of a
// 2816-wide row in 6 round trips to L2, not 11; 2 x 12 loads, 96 registers, no spills).
constexpr int kBranchBatch = 12;
constexpr int kBranchChunks = 2;

// One warp: row `row`'s two branches into mlp[0, dim) and moe[0, dim) (shared memory).
__device__ __forceinline__ void gather_expert_branches(const ExpertBranches& eb, int64_t row, int dim, int lane,
                                                       __nv_bfloat16* mlp, __nv_bfloat16* moe) {
  const int32_t* ro = eb.row_of + row * eb.slots;
  for (int c0 = 8 * lane; c0 < dim; c0 += kBranchChunks * 8 * 32) {
    float acc_mlp[kBranchChunks][8], acc_moe[kBranchChunks][8];
#pragma unroll
    for (int h = 0; h < kBranchChunks; ++h)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_mlp[h][i] = acc_moe[h][i] = 0.f;
    for (int k0 = 0; k0 < eb.slots; k0 += kBranchBatch) {
      // kBranchBatch slots' loads of every chunk first, then their sums in slot order (the order of the plain loop).
      int r[kBranchBatch];
      uint4 raw[kBranchChunks][kBranchBatch];
#pragma unroll
      for (int j = 0; j < kBranchBatch; ++j) r[j] = k0 + j < eb.slots ? ro[k0 + j] : -1;
#pragma unroll
      for (int h = 0; h < kBranchChunks; ++h) {
        const int c = c0 + h * 8 * 32;
#pragma unroll
        for (int j = 0; j < kBranchBatch; ++j)
          // Read once: through L2 only, so they do not evict the rows prefetched into L1 for the passes after.
          raw[h][j] = r[j] >= 0 && c < dim
                          ? __ldcg(reinterpret_cast<const uint4*>(eb.down + static_cast<int64_t>(r[j]) * dim + c))
                          : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int h = 0; h < kBranchChunks; ++h)
#pragma unroll
        for (int j = 0; j < kBranchBatch; ++j) {
          if (r[j] < 0) continue;  // no row: nothing added, as in the plain loop
          float v[8];
          unpack_bf16x8(raw[h][j], v);
          const bool routed = k0 + j < eb.top_k;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (routed)
              acc_moe[h][i] += v[i];
            else
              acc_mlp[h][i] += v[i];
          }
        }
    }
#pragma unroll
    for (int h = 0; h < kBranchChunks; ++h) {
      const int c = c0 + h * 8 * 32;
      if (c >= dim) continue;
      store_bf16x8(mlp + c, acc_mlp[h]);
      store_bf16x8(moe + c, acc_moe[h]);
    }
  }
  __syncwarp();
}

// rows x dim; every tensor's rows `dim` apart except where a stride is given. `b`, `wb`, `wc` and `scalar`
// are null for add_rms_norm (then `a` is y and `wa` is w).
template <typename T>
__global__ void __launch_bounds__(kRmsNormWarpsPerBlock * 32)
    residual_norm_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                         const T* __restrict__ wa, const T* __restrict__ wb, const T* __restrict__ wc,
                         const T* __restrict__ scalar, T* __restrict__ out, int64_t rows, int dim, float eps,
                         ResidualQuant<T> quant, ExpertBranches eb) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRmsNormWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t off = row * dim;
  const T* xr = x + off;
  const T* ar = a != nullptr ? a + off : nullptr;
  const T* br = b != nullptr ? b + off : nullptr;
  // Every row the passes below read from global memory, requested now: they arrive while the branches are gathered
  // and the first sums run (the weights are shared by the block's rows; a line already on its way costs nothing).
  prefetch_row_l1(xr, dim, lane);
  prefetch_row_l1(wa, dim, lane);
  prefetch_row_l1(wb, dim, lane);
  prefetch_row_l1(wc, dim, lane);
  if (quant.q != nullptr) prefetch_row_l1(quant.weight, dim, lane);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (eb.down != nullptr) {  // the branches from the expert pipeline (a and b unused)
      extern __shared__ __align__(16) unsigned char branch_smem[];
      T* mlp = reinterpret_cast<T*>(branch_smem) + static_cast<int64_t>(threadIdx.x >> 5) * 2 * dim;
      gather_expert_branches(eb, row, dim, lane, mlp, mlp + dim);
      ar = mlp;
      br = mlp + dim;
    }
  }
  T* outr = out + off;
  const float ra = row_inv_rms(ar, dim, eps, lane);
  if (br == nullptr) {
    // The stored value of element i (recomputed by the quantising passes, never read back from out).
    auto out_at = [&](int i) { return add_norm_value(xr, ar, wa, ra, i); };
    store_and_quantize(out_at, outr, dim, eps, lane, row, quant);
    return;
  }
  const float rb = row_inv_rms(br, dim, eps, lane);
  auto sum_at = [&](int i) {
    const float na = rounded<T>(__fmul_rn(__fmul_rn(to_float(ar[i]), ra), to_float(wa[i])));
    const float nb = rounded<T>(__fmul_rn(__fmul_rn(to_float(br[i]), rb), to_float(wb[i])));
    return rounded<T>(__fadd_rn(na, nb));
  };
  float ss = 0.f;
  for_row_elements<kRowBatchOf<T>>(dim, lane, sum_at, [&](int, float s) { ss = fmaf(s, s, ss); });
  const float rs = rsqrtf(warp_total(ss) / static_cast<float>(dim) + eps);
  const float k = to_float(*scalar);
  auto out_at = [&](int i) {
    const float n = rounded<T>(__fmul_rn(__fmul_rn(sum_at(i), rs), to_float(wc[i])));
    return to_float(from_float<T>(__fmul_rn(rounded<T>(__fadd_rn(to_float(xr[i]), n)), k)));
  };
  store_and_quantize(out_at, outr, dim, eps, lane, row, quant);
}

// The feed-forward residual with the expert pipeline's branches (bf16, the ffn form of residual_norm_kernel with eb),
// one row per block of kBranchRowThreads threads. The per-warp kernel walks a row's ~6 passes (gather, three norms,
// the output, the quantisation) with one warp, a long chain of dependent loads with 2 warps per multiprocessor at a
// step's 256 rows (99 us per layer on an H200 at c4fb56a, for ~16 MB of expert rows). Here every elementwise pass is
// spread over the block, each value staged in shared memory (bf16: every staged value is a bf16 value, so exact), and
// only the sums of squares run on one warp each, over the staged values in for_row_elements' order and row_inv_rms'
// butterfly: every fp32 sum, so every stored bit, is the per-warp kernel's (the maximum for the FP8 scale is
// order-free). Shared memory: the row's two branches, their normed sum and the output, 4 x dim bf16.
constexpr int kBranchRowThreads = 256;

inline size_t branch_row_smem_bytes(int dim) { return 4 * static_cast<size_t>(dim) * sizeof(__nv_bfloat16); }

static __global__ void __launch_bounds__(kBranchRowThreads)
    residual_branches_row_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ wa,
                                 const __nv_bfloat16* __restrict__ wb, const __nv_bfloat16* __restrict__ wc,
                                 const __nv_bfloat16* __restrict__ scalar, __nv_bfloat16* __restrict__ out, int dim,
                                 float eps, ResidualQuant<__nv_bfloat16> quant, ExpertBranches eb) {
  pdl_begin();
  using T = __nv_bfloat16;
  extern __shared__ __align__(16) unsigned char branch_row_smem[];
  T* mlp = reinterpret_cast<T*>(branch_row_smem);  // the dense MLP's branch (a)
  T* moe = mlp + dim;                               // the experts' branch (b)
  T* sum = moe + dim;                               // T(T(norm(a) * wa) + T(norm(b) * wb))
  T* res = sum + dim;                               // the stored output
  __shared__ float inv[4];                          // 1 / rms of a, b, the sum, the output
  __shared__ float amax_of[kBranchRowThreads / 32];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t row = blockIdx.x;
  const int64_t off = row * dim;
  // 1. The branches: each 8-element chunk summed over the slots in slot order (gather_expert_branches' sums), every
  // slot's load in flight at once.
  const int32_t* ro = eb.row_of + row * eb.slots;
  for (int c = 8 * tid; c < dim; c += 8 * kBranchRowThreads) {
    float acc_mlp[8], acc_moe[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc_mlp[i] = acc_moe[i] = 0.f;
    for (int k0 = 0; k0 < eb.slots; k0 += kBranchBatch) {
      int r[kBranchBatch];
      uint4 raw[kBranchBatch];
#pragma unroll
      for (int j = 0; j < kBranchBatch; ++j) r[j] = k0 + j < eb.slots ? ro[k0 + j] : -1;
#pragma unroll
      for (int j = 0; j < kBranchBatch; ++j)
        raw[j] = r[j] >= 0 ? __ldcg(reinterpret_cast<const uint4*>(eb.down + static_cast<int64_t>(r[j]) * dim + c))
                           : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int j = 0; j < kBranchBatch; ++j) {
        if (r[j] < 0) continue;
        float v[8];
        unpack_bf16x8(raw[j], v);
        const bool routed = k0 + j < eb.top_k;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (routed)
            acc_moe[i] += v[i];
          else
            acc_mlp[i] += v[i];
        }
      }
    }
    store_bf16x8(mlp + c, acc_mlp);
    store_bf16x8(moe + c, acc_moe);
  }
  __syncthreads();
  // 2. Each branch's 1 / rms (warps 0 and 1).
  if (warp < 2) {
    const float r = row_inv_rms<T>(warp == 0 ? mlp : moe, dim, eps, lane);
    if (lane == 0) inv[warp] = r;
  }
  __syncthreads();
  // 3. The normed sum, elementwise (residual_norm_kernel's sum_at).
  {
    const float ra = inv[0], rb = inv[1];
    for (int i = tid; i < dim; i += kBranchRowThreads) {
      const float na = rounded<T>(__fmul_rn(__fmul_rn(to_float(mlp[i]), ra), to_float(wa[i])));
      const float nb = rounded<T>(__fmul_rn(__fmul_rn(to_float(moe[i]), rb), to_float(wb[i])));
      sum[i] = from_float<T>(__fadd_rn(na, nb));
    }
  }
  __syncthreads();
  if (warp == 0) {
    const float r = row_inv_rms<T>(sum, dim, eps, lane);
    if (lane == 0) inv[2] = r;
  }
  __syncthreads();
  // 4. The output, elementwise (out_at), stored and staged.
  {
    const float rs = inv[2], k = to_float(*scalar);
    const T* xr = x + off;
    T* outr = out + off;
    for (int i = tid; i < dim; i += kBranchRowThreads) {
      const float n = rounded<T>(__fmul_rn(__fmul_rn(to_float(sum[i]), rs), to_float(wc[i])));
      const T v = from_float<T>(__fmul_rn(rounded<T>(__fadd_rn(to_float(xr[i]), n)), k));
      outr[i] = v;
      res[i] = v;
    }
  }
  if (quant.q == nullptr) return;
  __syncthreads();
  // 5. The next GEMM's FP8 input (store_and_quantize): the output's 1 / rms, the block's maximum, the codes.
  if (warp == 0) {
    const float r = row_inv_rms<T>(res, dim, eps, lane);
    if (lane == 0) inv[3] = r;
  }
  __syncthreads();
  const float rq = inv[3];
  float amax = 0.f;
  for (int i = tid; i < dim; i += kBranchRowThreads)
    amax = fmaxf(amax, fabsf(__bfloat162float(normed_value(to_float(res[i]), quant.weight, i, rq))));
  amax = warp_max(amax);
  if (lane == 0) amax_of[warp] = amax;
  __syncthreads();
  float m = 0.f;
#pragma unroll
  for (int w = 0; w < kBranchRowThreads / 32; ++w) m = fmaxf(m, amax_of[w]);
  const float s = fp8_scale_from_amax(m);
  uint8_t* qr = quant.q + off;
  for (int i = tid; i < dim; i += kBranchRowThreads)
    qr[i] = fp8_quantize(__bfloat162float(normed_value(to_float(res[i]), quant.weight, i, rq)), s);
  if (tid == 0) quant.scale[row] = s;
}

// Which kernel sums the expert branches: DGEMMA_RESIDUAL_KERNEL = "block" (the default: residual_branches_row_kernel)
// or "warp" (residual_norm_kernel's per-warp rows, for the A/B and triage), read once per process: 1, 0, or -1 for
// another name (the launcher refuses it by name).
inline int residual_kernel_setting() {
  static const int v = [] {
    const char* s = std::getenv("DGEMMA_RESIDUAL_KERNEL");
    if (s == nullptr || *s == '\0' || std::strcmp(s, "block") == 0) return 1;
    return std::strcmp(s, "warp") == 0 ? 0 : -1;
  }();
  return v;
}

// The decoder's input in one pass (bf16): x = T(T(table[ids[row]] * scale) [+ add[row]]) normed weightless,
// out = T(x * rms(x)^-1), each step rounded as the reference's embed, add and rms_norm round it (python/dgemma/ops/
// reference.py embed_norm); with quant.q also the first layer's FP8 attention input (store_and_quantize). An id
// outside [0, vocab) reads no memory and gives a zero row (the engine validates ids before they get here).
static __global__ void __launch_bounds__(kRmsNormWarpsPerBlock * 32)
    embed_norm_kernel(const int64_t* __restrict__ ids, const __nv_bfloat16* __restrict__ table, int64_t vocab,
                      float scale, const __nv_bfloat16* __restrict__ add, __nv_bfloat16* __restrict__ out,
                      int64_t rows, int dim, float eps, ResidualQuant<__nv_bfloat16> quant) {
  pdl_begin();
  using T = __nv_bfloat16;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRmsNormWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t id = ids[row];
  const bool known = id >= 0 && id < vocab;
  const T* er = table + (known ? id : 0) * static_cast<int64_t>(dim);
  const T* ar = add != nullptr ? add + row * dim : nullptr;
  // The decoder input's element i as stored before the norm (recomputed wherever it is read).
  auto x_at = [&](int i) {
    float v = known ? rounded<T>(__fmul_rn(to_float(er[i]), scale)) : 0.f;
    if (ar != nullptr) v = rounded<T>(__fadd_rn(v, to_float(ar[i])));
    return v;
  };
  float ss = 0.f;
  for_row_elements<kRowBatchOf<T>>(dim, lane, x_at, [&](int, float v) { ss = fmaf(v, v, ss); });
  const float inv_rms = rsqrtf(warp_total(ss) / static_cast<float>(dim) + eps);
  auto out_at = [&](int i) { return to_float(normed_value<T>(x_at(i), nullptr, i, inv_rms)); };
  store_and_quantize(out_at, out + row * dim, dim, eps, lane, row, quant);
}

inline cudaError_t embed_norm(const int64_t* ids, const __nv_bfloat16* table, int64_t vocab, float scale,
                              const __nv_bfloat16* add, __nv_bfloat16* out, int64_t rows, int dim, float eps,
                              cudaStream_t stream, ResidualQuant<__nv_bfloat16> quant = {}) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRmsNormWarpsPerBlock - 1) / kRmsNormWarpsPerBlock;
  return launch_kernel(embed_norm_kernel, static_cast<unsigned>(blocks), kRmsNormWarpsPerBlock * 32, 0, stream, ids,
                       table, vocab, scale, add, out, rows, dim, eps, quant);
}

// eb (bf16, the ffn form with wb, wc and scalar given): the branches come from the expert pipeline and a, b are null.
template <typename T>
cudaError_t residual_norm(const T* x, const T* a, const T* b, const T* wa, const T* wb, const T* wc,
                          const T* scalar, T* out, int64_t rows, int dim, float eps, cudaStream_t stream,
                          ResidualQuant<T> quant = {}, ExpertBranches eb = {}) {
  if (rows == 0) return cudaSuccess;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (eb.down != nullptr && residual_kernel_setting() == 1)
      return launch_kernel_smem<residual_branches_row_kernel>(static_cast<unsigned>(rows), kBranchRowThreads,
                                                              branch_row_smem_bytes(dim), stream, x, wa, wb, wc,
                                                              scalar, out, dim, eps, quant, eb);
  }
  const int64_t blocks = (rows + kRmsNormWarpsPerBlock - 1) / kRmsNormWarpsPerBlock;
  const size_t smem = eb.down != nullptr ? expert_branches_smem_bytes(dim) : 0;
  return launch_kernel(residual_norm_kernel<T>, static_cast<unsigned>(blocks), kRmsNormWarpsPerBlock * 32, smem,
                       stream, x, a, b, wa, wb, wc, scalar, out, rows, dim, eps, quant, eb);
}

}  // namespace dgemma::kernels
