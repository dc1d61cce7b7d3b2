// Tile shapes of the tensor-core attention kernel (sm90_attention.cuh). Plain C++ so that the
// bindings (built by g++ without CUDA) can report them to the Python planner (dgemma.attention_plan).
#pragma once

namespace dgemma::kernels {

// NOTE: every block has 8 warps. A warp owns 16 query rows and a 128-wide slice of the head dim, so
// its output accumulator is 16x128 fp32 (64 registers per thread) for any head_dim. head_dim 256 uses
// 4 row groups x 2 slices (64 query rows per block), head_dim 512 uses 2 row groups x 4 slices (32 rows).
// Key tiles are sized so that double-buffered K and V tiles take 128 KiB of shared memory.
constexpr int kAttentionThreads = 256;
constexpr int kAttentionSliceDim = 128;

constexpr bool attention_head_dim_supported(int head_dim) { return head_dim == 256 || head_dim == 512; }
constexpr int attention_block_m(int head_dim) { return head_dim == 256 ? 64 : 32; }
constexpr int attention_block_n(int head_dim) { return head_dim == 256 ? 64 : 32; }

// The wgmma kernel (sm90_attention_wgmma.cuh): two warpgroups over one KV head's query rows packed head-minor (packed
// row r of a KV group is query t = r / group of query head kv_head * group + r % group), so the query heads of a group
// share every K/V tile. head_dim 256: each warpgroup owns 64 of the block's 128 rows and the whole head dim; head_dim
// 512: both own the block's 64 rows, each half of the head dim (its half of Q·Kᵀ, summed through shared memory, and
// its half of the output columns). Key tiles have the mma.sync kernel's sizes (one split plan serves both).
constexpr int kAttentionWgmmaThreads = 256;
constexpr int attention_wgmma_block_m(int head_dim) { return head_dim == 256 ? 128 : 64; }  // packed query rows
constexpr int attention_wgmma_block_n(int head_dim) { return attention_block_n(head_dim); }
// The deep-pipeline variant (DGEMMA_ATTENTION=wgmma_deep): at head_dim 256, 48-key tiles in three stages, so each key
// tile is requested two tiles before it is multiplied (the two-stage kernel: one); head_dim 512 is the wgmma kernel.
constexpr int attention_wgmma_deep_block_n(int head_dim) { return head_dim == 256 ? 48 : attention_block_n(head_dim); }
constexpr int attention_wgmma_stages(int head_dim, bool deep) { return deep && head_dim == 256 ? 3 : 2; }

}  // namespace dgemma::kernels
