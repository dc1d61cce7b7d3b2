// Attention on Hopper wgmma: the same operation, parameters, masks, split-KV and in-kernel combine as attention_bf16
// (sm90_attention_bf16.cuh), computed by warpgroup MMAs.
//
// A CTA owns kBlockM query rows of one KV head and sequence, packed head-minor (packed row r is query t = r / group of
// query head kv_head * group + r % group), so the query heads of a group read each K/V tile once. Two warpgroups of 128
// threads:
//   head_dim 256 (sliding layers): each owns 64 of the block's 128 rows and the whole head dim;
//   head_dim 512 (full layers): both own the block's 64 rows; each multiplies its half of the head dim in Q·Kᵀ (the
//     halves are summed through shared memory, in the same order by both, so both hold the same S) and owns half of
//     the output columns in P·V.
// Per key tile:
//   S = Q·Kᵀ  wgmma m64nBNk16, both operands from shared memory (Q and K rows K-major, 128-byte swizzle);
//   online softmax on the S accumulator in registers (fp32, base-2 exponentials, row state per thread);
//   O += P·V  wgmma m64n256k16 with P from registers (the S accumulator rounded to bf16 is already in the A-operand
//             register layout) and V from shared memory read as the MN-major Vᵀ.
// Every shared-memory operand is a 64- or BN-row x 256-column tile, one per head-dim half. K/V tiles are gathered by
// all 256 threads with cp.async (the prefix from the ring or linear cache, the tail from its own tensor: rows of one
// tile may come from three places, which TMA boxes cannot express) into two stages, so the next tile streams in while
// this one is multiplied (the deep variant at head_dim 256: 48-key tiles in three stages, each requested two tiles
// ahead). The O accumulator is 64x256 fp32 per warpgroup (128 registers per thread).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cute/arch/mma_sm90.hpp"
#include "cute/atom/mma_atom.hpp"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "kernels/attention_tiles.cuh"
#include "kernels/pdl.cuh"
#include "kernels/sm90_attention_bf16.cuh"

namespace dgemma::kernels {

namespace attention_wgmma_detail {

using namespace cute;
using attention_detail::KeyRange;
using attention_detail::KeySource;
using bf16 = cutlass::bfloat16_t;

constexpr int kThreads = kAttentionWgmmaThreads;
constexpr int kWarpgroupM = 64;  // rows of a warpgroup's S and O
constexpr int kHalf = 256;       // head-dim columns of every shared-memory operand tile and of a warpgroup's O
constexpr int kPingpongBarrier = 1;  // named barrier id (0 is __syncthreads)

// The S = Q·Kᵀ wgmma of a key tile of N keys: m64nNk16, both operands K-major from shared memory. N = 48 is one of
// CuTe's extended shapes, declared where CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED is defined before CuTe is included
// (attention_sm90_wgmma_deep_d256.cu, the only translation unit that uses it).
template <int N>
struct QkAtom;
template <>
struct QkAtom<64> {
  using type = SM90_64x64x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
};
template <>
struct QkAtom<32> {
  using type = SM90_64x32x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
};
#if defined(CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)
template <>
struct QkAtom<48> {
  using type = SM90_64x48x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>;
};
#endif

// kDeep: the deep-pipeline variant (attention_tiles.cuh attention_wgmma_deep_block_n).
template <int D, bool kDeep = false>
struct Config {
  static_assert(D == 256 || D == 512, "head_dim 256 or 512");
  static constexpr int kHalves = D / kHalf;                     // head-dim halves: 1, or 2 split between warpgroups
  static constexpr int kBlockM = attention_wgmma_block_m(D);    // 128 (two row groups) or 64 (one, shared)
  // 64 or 32 keys (deep, head_dim 256: 48)
  static constexpr int kBlockN = kDeep ? attention_wgmma_deep_block_n(D) : attention_wgmma_block_n(D);
  static constexpr int kStages = attention_wgmma_stages(D, kDeep);  // key tiles in flight + 1
  static_assert(kBlockM == (kHalves == 1 ? 2 : 1) * kWarpgroupM, "head_dim 256 splits rows, 512 the head dim");
  using BlockN = Int<kBlockN>;
  // Q and K tiles: rows x 256 head-dim columns, K-major (the operands of S = Q·Kᵀ); Q has two (the warpgroups' rows,
  // or the head-dim halves), K kHalves per stage.
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kWarpgroupM>, Int<kHalf>, _2>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<BlockN, Int<kHalf>, Int<kHalves * kStages>>{}));
  // Vᵀ tiles: 256 head-dim rows x keys with the head dim contiguous (the MN-major B operand of O = P·V), so a key's
  // row of V is stored as it is in memory.
  using SmemLayoutVt =
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{}, Shape<Int<kHalf>, BlockN, Int<kHalves * kStages>>{}));
  using MmaQK = decltype(make_tiled_mma(typename QkAtom<kBlockN>::type{}));
  using MmaPV = decltype(make_tiled_mma(SM90_64x256x16_F32BF16BF16_RS<GMMA::Major::K, GMMA::Major::MN>{}));
  static constexpr int kSRegs = kWarpgroupM * kBlockN / 128;  // S accumulator registers per thread

  struct Smem {
    alignas(1024) bf16 q[cosize_v<SmemLayoutQ>];
    alignas(1024) bf16 k[cosize_v<SmemLayoutK>];
    alignas(1024) bf16 v[cosize_v<SmemLayoutVt>];
    float s_part[kHalves][kHalves == 2 ? kSRegs : 1][128];  // head_dim 512: each warpgroup's half of S, register-major
    int ok[kStages][kBlockN];
  };
  // The 128-byte swizzle needs 1024-byte aligned tiles; dynamic shared memory follows the kernel's static variables,
  // so the kernel aligns its base up and asks for the slack.
  static constexpr size_t kSmemBytes = sizeof(Smem) + 1024;
  // 227 KB: an SM's opt-in limit for dynamic and static shared memory together (the static variables take < 1 KB).
  static_assert(kSmemBytes + 1024 <= 227 * 1024, "shared memory of one SM");
};

// An m64nN accumulator's register layout ((2, 2, N/8), 1, 1) viewed as (rows, cols) = ((2, 1), (2, N/8, 1)): a thread
// holds 2 rows (r, r + 8) and N/4 columns of each.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rowcol(Layout l) {
  static_assert(decltype(rank(l))::value == 3, "an MMA accumulator layout");
  return make_layout(make_layout(layout<0, 1>(l), layout<1>(l)),
                     make_layout(layout<0, 0>(l), layout<0, 2>(l), layout<2>(l)));
}

// The same registers as the A operand of k16 register-sourced wgmmas: ((2, 2, 2), 1, N/16). Value v of an m64nN
// accumulator sits at row 8·(v/2 % 2) + lane/4 (+16·warp), column 8·(v/4) + 2·(lane % 4) + v % 2, exactly where the
// A fragment of an m64k16 wgmma wants the k-block's value v % 8 of column group v / 8.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout l) {
  static_assert(decltype(rank(l))::value == 3 && decltype(size<1>(l))::value == 1 && decltype(size<2>(l))::value == 1,
                "one m64 accumulator");
  auto cols = logical_divide(layout<0, 2>(l), Int<2>{});  // (2 column groups of a k-block, k-blocks)
  return make_layout(make_layout(layout<0, 0>(l), layout<0, 1>(l), layout<0>(cols)), layout<1>(l), layout<1>(cols));
}

template <int D, bool kDeep>
__global__ void __launch_bounds__(kThreads, 1) attention_wgmma_kernel(const AttentionParams p) {
  pdl_begin();
  using C = Config<D, kDeep>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kHalves = C::kHalves;
  constexpr int kChunks = D / 8, kHalfChunks = kHalf / 8;  // 16-byte chunks of a row, of a half

  extern __shared__ uint8_t smem_raw[];
  auto& sm = *reinterpret_cast<typename C::Smem*>(smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u));

  const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
  // head_dim 256: this warpgroup's rows start at 64·wg, it multiplies the only half; head_dim 512: the rows are
  // shared, it multiplies head-dim half wg and owns output columns 256·wg...
  const int wg_row0 = kHalves == 1 ? wg * kWarpgroupM : 0;
  const int half = kHalves == 1 ? 0 : wg;
  const int group = p.hq / p.hkv;
  const int r0 = blockIdx.x * kBlockM;
  const int kvh = blockIdx.y;
  const int b = blockIdx.z / p.num_splits, split = blockIdx.z % p.num_splits;
  const KeyRange kr = attention_detail::key_range(p, b);

  // Keys this CTA's queries (t_first..t_last) can see, intersected with this split's chunk of key tiles.
  const int t_first = r0 / group, t_last = min(p.t - 1, (r0 + kBlockM - 1) / group);
  int kv_lo = 0, kv_hi = kr.n_kv;
  if (p.causal) {
    kv_hi = min(kr.n_kv, kr.n_prefix + t_last + 1);
    if (p.window > 0) kv_lo = max(0, kr.n_prefix + t_first - p.window + 1);
  }
  const int tile_lo = attention_detail::split_tile_lo(kv_lo / kBlockN, split, p.split_tiles);
  const int tile_hi = attention_detail::split_tile_hi((kv_hi + kBlockN - 1) / kBlockN, split, p.split_tiles);
  const bool pingpong = kHalves == 1 && p.wgmma_pingpong != 0;  // uniform: every thread takes the same branches

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename C::SmemLayoutQ{});   // (64, 256, row group or half)
  Tensor sK = make_tensor(make_smem_ptr(sm.k), typename C::SmemLayoutK{});   // (keys, 256, stage·halves + half)
  Tensor sVt = make_tensor(make_smem_ptr(sm.v), typename C::SmemLayoutVt{});  // (256, keys, stage·halves + half)

  const KeySource cache{p.cache_k + b * p.ck_sb + kvh * p.ck_sh, p.cache_v + b * p.cv_sb + kvh * p.cv_sh};
  const KeySource tail{p.tail_k + b * p.tk_sb + kvh * p.tk_sh, p.tail_v + b * p.tv_sb + kvh * p.tv_sh};
  constexpr int kRowStep = kThreads / kChunks;  // a thread's rows are kRowStep apart
  // This thread's rows of every tile the CTA copies (consecutive tiles from tile_lo): one walk over their keys.
  // (An empty split may have tile_lo far past the keys, where tile_lo · kBlockN would overflow: its walk never runs.)
  attention_detail::KeyRowWalk walk(p, kr, cache, tail, tile_lo < tile_hi ? tile_lo * kBlockN + tid / kChunks : 0,
                                    kRowStep, tid % kChunks * 8);
  auto load_tile = [&](int tile, int stage) {
    const int kv0 = tile * kBlockN, chunk = tid % kChunks;
    const int h = stage * kHalves + chunk / kHalfChunks, col = chunk % kHalfChunks * 8;
    // Rows 8 apart have the same 128-byte swizzle, so the same chunk of them is a fixed distance apart (checked on the
    // host for every row, column and stage): the addresses of a thread's first 8 / kRowStep rows, then additions.
    static_assert(8 % kRowStep == 0 && kBlockN % 8 == 0, "a thread's rows repeat their swizzle every 8 rows");
    constexpr int kSwizzleRows = 8 / kRowStep;
    const int row0 = tid / kChunks;  // this thread's first row
    uint32_t k_at[kSwizzleRows], v_at[kSwizzleRows];
#pragma unroll
    for (int j = 0; j < kSwizzleRows; ++j) {
      k_at[j] = smem_addr(&sK(row0 + j * kRowStep, col, h));
      v_at[j] = smem_addr(&sVt(col, row0 + j * kRowStep, h));
    }
    const uint32_t k8 = smem_addr(&sK(row0 + 8, col, h)) - k_at[0], v8 = smem_addr(&sVt(col, row0 + 8, h)) - v_at[0];
#pragma unroll
    for (int i = 0; i < kBlockN / kRowStep; ++i) {  // row row0 + i·kRowStep = row0 + j·kRowStep + 8·period
      const int j = i % kSwizzleRows, period = i / kSwizzleRows, kv = kv0 + row0 + i * kRowStep;
      const KeySource src = walk.next(p, kr, cache, tail, kRowStep, chunk * 8);
      attention_detail::cp_async16(k_at[j] + period * k8, src.k, kv < kr.n_kv);
      attention_detail::cp_async16(v_at[j] + period * v8, src.v, kv < kr.n_kv);
    }
    if (tid < kBlockN) sm.ok[stage][tid] = attention_detail::key_allowed(p, kr, b, kv0 + tid);
  };

  // The block's packed rows of Q (rows past the queries are zeros), then the first key tile.
  {
    const int chunk = tid % kChunks, col = chunk % kHalfChunks * 8;
#pragma unroll 4
    for (int r = tid / kChunks; r < kBlockM; r += kThreads / kChunks) {
      const int packed = r0 + r, t = packed / group;
      const int h = kvh * group + packed % group;
      const __nv_bfloat16* src = p.q + b * p.q_sb + h * p.q_sh + int64_t(t < p.t ? t : 0) * p.q_st + chunk * 8;
      const int tile = kHalves == 1 ? r / kWarpgroupM : chunk / kHalfChunks;
      attention_detail::cp_async16(smem_addr(&sQ(r % kWarpgroupM, col, tile)), src, t < p.t);
    }
  }
  // The first kStages - 1 key tiles, a commit group each (empty past the last tile: one group per tile throughout, so
  // waiting for all but the newest kStages - 2 groups means waiting for the tile about to be multiplied).
#pragma unroll
  for (int i = 0; i < C::kStages - 1; ++i) {
    if (i < tile_hi - tile_lo) load_tile(tile_lo + i, i);  // (tile_lo + i may overflow for an empty split)
    kernels::cp_async_commit();
  }

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ(_, _, wg));  // (MMA, 1, 256/16) descriptors: its rows or its half
  Tensor tSrK = thr_qk.partition_fragment_B(sK);    // (MMA, 1, 256/16, stage·halves + half)
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);  // (MMA, 1, keys/16, stage·halves + half)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kWarpgroupM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kWarpgroupM>, Int<kHalf>>{});
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kWarpgroupM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kWarpgroupM>, Int<kHalf>>{}));
  Tensor s_rc = make_tensor(tSrS.data(), rowcol(tSrS.layout()));
  Tensor o_rc = make_tensor(tOrO.data(), rowcol(tOrO.layout()));
  Tensor cs_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  Tensor co_rc = make_tensor(tOcO.data(), rowcol(tOcO.layout()));
  constexpr int kRows = size<0>(decltype(s_rc.layout()){});
  static_assert(kRows == 2 && size<0>(decltype(o_rc.layout()){}) == 2, "a thread holds two rows of S and O");
  static_assert(size(decltype(tSrS.layout()){}) == C::kSRegs, "S registers");
  Tensor rP = make_tensor<bf16>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
  static_assert(size<2>(decltype(tOrP.layout()){}) == kBlockN / 16, "one A fragment per k-block of the key tile");
  clear(tOrO);

  // Per-thread row state: the query (t) and head of each of its two rows, the running max and partial sum.
  int row_t[kRows], row_h[kRows];
  float m[kRows], l[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int packed = r0 + wg_row0 + get<0>(cs_rc(r, 0));
    row_t[r] = packed / group;
    row_h[r] = kvh * group + packed % group;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }

  int stage = 0;  // (tile - tile_lo) % kStages
  for (int tile = tile_lo; tile < tile_hi; ++tile) {
    kernels::cp_async_wait<C::kStages - 2>();
    cutlass::arch::fence_view_async_shared();  // this thread's cp.async writes, visible to the wgmma (async) proxy
    __syncthreads();  // tile `tile` is in; both warpgroups are done with the previous tile's stage (and with s_part)

    // S = Q Kᵀ over this warpgroup's head-dim half. Ping-pong (head_dim 256, where the warpgroups are independent):
    // warpgroup 1 issues after warpgroup 0, so 0's softmax runs while the tensor cores work on 1's Q·Kᵀ, and 1's
    // softmax while they work on 0's P·V.
    if (pingpong && wg == 1) asm volatile("bar.sync %0, %1;" ::"n"(kPingpongBarrier), "n"(kThreads) : "memory");
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, stage * kHalves + half), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    if (pingpong && wg == 0) asm volatile("bar.arrive %0, %1;" ::"n"(kPingpongBarrier), "n"(kThreads) : "memory");
    // Tile tile + kStages - 1's copies are issued while the tensor cores work on Q·Kᵀ: they fill the previous tile's
    // stage, which no wgmma reads any more (the barrier above follows both warpgroups' last P·V on it).
    if (C::kStages - 1 < tile_hi - tile) load_tile(tile + C::kStages - 1, stage == 0 ? C::kStages - 1 : stage - 1);
    kernels::cp_async_commit();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    if constexpr (kHalves == 2) {
      // Both halves summed as own + other: the same S in both warpgroups (fp32 addition commutes).
#pragma unroll
      for (int i = 0; i < C::kSRegs; ++i) sm.s_part[wg][i][wtid] = tSrS(i);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < C::kSRegs; ++i) tSrS(i) += sm.s_part[wg ^ 1][i][wtid];
    }

    const int kv0 = tile * kBlockN;
    const bool need_mask = kv0 + kBlockN > kr.n_kv || p.valid != nullptr ||
                           (p.causal && (kv0 + kBlockN - 1 > kr.n_prefix + t_first ||
                                         (p.window > 0 && kv0 <= kr.n_prefix + t_last - p.window)));
    if (need_mask) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int last = kr.n_prefix + row_t[r];  // last key index the row may see
#pragma unroll
        for (int c = 0; c < size<1>(s_rc); ++c) {
          const int n = get<1>(cs_rc(0, c)), kv = kv0 + n;
          bool keep = sm.ok[stage][n] != 0;
          if (p.causal) keep = keep && kv <= last && (p.window == 0 || kv > last - p.window);
          s_rc(r, c) = keep ? s_rc(r, c) : -INFINITY;
        }
      }
    }

    // Online softmax; a row's columns are spread over the 4 lanes of a quad.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = m[r];
#pragma unroll
      for (int c = 0; c < size<1>(s_rc); ++c) mx = fmaxf(mx, s_rc(r, c));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float ms = mx == -INFINITY ? 0.f : mx * attention_detail::kLog2e;  // fully masked so far: keep exp2 finite
      // The rescale of what this row summed so far: exactly 1 where the max did not move (also while the row has
      // seen no key: its sums are still 0).
      const float alpha = mx == m[r] ? 1.f : exp2f(fmaf(m[r], attention_detail::kLog2e, -ms));
      m[r] = mx;
      float rowsum = 0.f;
#pragma unroll
      for (int c = 0; c < size<1>(s_rc); ++c) {
        s_rc(r, c) = exp2f(fmaf(s_rc(r, c), attention_detail::kLog2e, -ms));
        rowsum += s_rc(r, c);
      }
      l[r] = l[r] * alpha + rowsum;
      if (alpha != 1.f) {  // most tiles leave a row's max where it was
#pragma unroll
        for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= alpha;
      }
    }
#pragma unroll
    for (int i = 0; i < size(tSrS); ++i) rP(i) = static_cast<bf16>(tSrS(i));

    // O += P V over this warpgroup's output columns. P's registers are fenced on both sides of the wgmma that reads
    // them: written before it is issued, untouched until it is done.
    Tensor rP_regs = recast<uint32_t>(rP);
    warpgroup_fence_operand(rP_regs);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < size<2>(tOrP); ++kb)
      cute::gemm(mma_pv, tOrP(_, _, kb), tOrVt(_, _, kb, stage * kHalves + half), tOrO);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(rP_regs);
    stage = stage + 1 == C::kStages ? 0 : stage + 1;
  }
  kernels::cp_async_wait<0>();

  float inv[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row that saw no key (padding, an empty split): output 0, lse -inf
  }
  static_assert(size<1>(decltype(o_rc.layout()){}) % 2 == 0, "column pairs");
  const int col0 = half * kHalf;  // this warpgroup's first output column
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (row_t[r] >= p.t) continue;
    if (p.num_splits == 1) {
      __nv_bfloat16* orow = p.out + b * p.o_sb + int64_t(row_t[r]) * p.o_st + row_h[r] * p.o_sh + col0;
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); c += 2)
        *reinterpret_cast<__nv_bfloat162*>(orow + get<1>(co_rc(r, c))) =
            __floats2bfloat162_rn(o_rc(r, c) * inv[r], o_rc(r, c + 1) * inv[r]);
    } else {
      const int64_t prow = ((int64_t(split) * p.batch + b) * p.hq + row_h[r]) * p.t + row_t[r];
      float* orow = p.part_o + prow * D + col0;
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); c += 2)
        *reinterpret_cast<float2*>(orow + get<1>(co_rc(r, c))) =
            make_float2(o_rc(r, c) * inv[r], o_rc(r, c + 1) * inv[r]);
      if (col0 + get<1>(co_rc(r, 0)) == 0) p.part_lse[prow] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
    }
  }
  if (p.num_splits > 1 &&
      attention_detail::last_split_to_arrive(p.split_counters + (int64_t(b) * p.hkv + kvh) * gridDim.x + blockIdx.x,
                                             p.num_splits)) {
    auto row_at = [&](int r) {
      const int packed = r0 + r;
      return attention_detail::CombineRow{kvh * group + packed % group, packed / group};
    };
    // The K tiles are free now (every copy landed, every wgmma reading them is done): the combine's shared memory.
    constexpr int64_t kScratchFloats = int64_t(cosize_v<typename C::SmemLayoutK>) * sizeof(bf16) / sizeof(float);
    if (attention_detail::combine_smem_floats(kBlockM, p.num_splits) <= kScratchFloats) {
      attention_detail::combine_split_rows<D>(p, b, kBlockM, row_at, reinterpret_cast<float*>(sm.k));
    } else {
      constexpr int kVecs = D / 4;
      for (int i = tid; i < kBlockM * kVecs; i += kThreads) {
        const attention_detail::CombineRow x = row_at(i / kVecs);
        if (x.t < p.t) attention_detail::combine_split_chunk<D>(p, b, x.h, x.t, i % kVecs);
      }
    }
  }
}

}  // namespace attention_wgmma_detail

// Launches the wgmma attention (with num_splits > 1 the splits combine themselves; split_counters holds
// [B, Hkv, ceil(group·T / block_m)] counters). The launcher has validated `p`, including group·T + 256 < 2^31, and
// planned the splits over the variant's key tiles (kDeep: attention_wgmma_deep_block_n).
template <int D, bool kDeep = false>
cudaError_t attention_wgmma(const AttentionParams& p, cudaStream_t stream) {
  using C = attention_wgmma_detail::Config<D, kDeep>;
  if (p.t <= 0 || p.batch <= 0) return cudaSuccess;
  const int packed = p.hq / p.hkv * p.t;
  const dim3 grid((packed + C::kBlockM - 1) / C::kBlockM, p.hkv, p.batch * p.num_splits);
  return launch_kernel_smem<attention_wgmma_detail::attention_wgmma_kernel<D, kDeep>>(grid, kAttentionWgmmaThreads,
                                                                                      C::kSmemBytes, stream, p);
}

}  // namespace dgemma::kernels
