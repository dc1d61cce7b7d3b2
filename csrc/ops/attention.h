// Launchers of the attention domain: tensor-core attention over [cached prefix ; tail] and the fused
// q/k/v preparation. Every argument is validated here (std::invalid_argument -> Python ValueError).
#pragma once

#include <cstdint>
#include <utility>

#include "ops/tensor_arg.h"

namespace dgemma {

struct AttentionOptions {
  int64_t max_prefix = 0;  // >= every prefix_lens[b]; device values above it are clamped
  int64_t ring_size = 0;   // 0: the cache stores position p at slot p; else slot p % ring_size
  int64_t window = 0;      // 0: whole prefix; else the last window-1 cached positions (+ causal window)
  bool causal = false;     // encoder: key position <= query position
  bool valid_tail = false; // `valid` also masks the tail (encoder's new tokens)
  int64_t num_splits = 1;  // split-KV: key tiles cut into chunks of split_tiles
  int64_t split_tiles = 1;
  int64_t impl = 0;  // kAttentionMmaSync, kAttentionWgmma or kAttentionWgmmaDeep
};

// The attention implementations (the bindings' `impl` values).
constexpr int64_t kAttentionMmaSync = 0;  // mma.sync m16n8k16, one query head per CTA (sm90_attention_bf16.cuh)
constexpr int64_t kAttentionWgmma = 1;    // wgmma, the query heads of a KV group packed (sm90_attention_wgmma.cuh)
// The wgmma kernel with a deeper key pipeline at head_dim 256 (48-key tiles, three stages: attention_tiles.cuh); at
// head_dim 512 the wgmma kernel itself.
constexpr int64_t kAttentionWgmmaDeep = 2;
constexpr bool attention_is_wgmma(int64_t impl) { return impl == kAttentionWgmma || impl == kAttentionWgmmaDeep; }

// out[b, t, h] = softmax(q[b, h, t] . keys) values over keys = [visible cached prefix ; tail].
// q [B, Hq, T, D] bf16; cache_k/cache_v [B, Hkv, slots, D]; tail_k/tail_v [B, Hkv, T, D]; prefix_lens
// int32 [B]; valid bool/uint8 [B, >= max_prefix (+T)] or null; out [B, T, Hq, D]; part_o fp32
// [S, B, Hq, T, D], part_lse fp32 [S, B, Hq, T] and split_counters int32 [B, Hq, ceil(T / block_m)] (wgmma:
// [B, Hkv, ceil(Hq / Hkv * T / block_m)], block_m counting packed rows) when num_splits S > 1 (else may be null).
// split_counters must hold zeros, and holds zeros again when the kernel is done (the splits of a query tile count
// themselves in; the last combines and resets): calls sharing one counter tensor must be stream-ordered.
// D is 256 or 512; all bf16 tensors have a contiguous last dim and other strides multiple of 8.
void attention_forward(const TensorArg& q, const TensorArg& cache_k, const TensorArg& cache_v,
                       const TensorArg& tail_k, const TensorArg& tail_v, const TensorArg& prefix_lens,
                       const TensorArg* valid, const TensorArg& out, const TensorArg* part_o,
                       const TensorArg* part_lse, const TensorArg* split_counters, const AttentionOptions& opt,
                       std::uintptr_t stream);

// (block_m, block_n) of the attention kernel `impl` for a head dim; throws for unsupported head dims or impls. The
// wgmma kernel's block_m counts query rows of a KV group packed head-minor (see attention_tiles.cuh).
std::pair<int, int> attention_tile_shape(int64_t head_dim, int64_t impl = kAttentionMmaSync);

// q_out = rope(rms_norm(q_in, q_weight)), k_out = rope(rms_norm(k_in, k_weight)), v_out = rms_norm(v_in
// or k_in without weight), per head; k/v also written into cache_k/cache_v at positions
// cache_start.. when those are given (ring caches keep only the last ring_size tokens).
// q_in [B, T, Hq*D], k_in/v_in [B, T, Hkv*D] (rows may be strided, e.g. column slices of one fused
// projection); cos/sin [B or 1, T, D]; q_out [B, T, Hq, D], k_out/v_out [B, T, Hkv, D] contiguous.
void qkv_prep(const TensorArg& q_in, const TensorArg& k_in, const TensorArg* v_in, const TensorArg& q_weight,
              const TensorArg& k_weight, const TensorArg& cos, const TensorArg& sin, const TensorArg& q_out,
              const TensorArg& k_out, const TensorArg& v_out, const TensorArg* cache_k, const TensorArg* cache_v,
              int64_t cache_start, int64_t ring_size, double eps, std::uintptr_t stream);

}  // namespace dgemma
