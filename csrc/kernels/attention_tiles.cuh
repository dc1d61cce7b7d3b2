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

// The wgmma kernel (sm90_attention_wgmma.cuh): two consumer warpgroups of 64 rows each over one KV head's query rows
// packed head-minor (row r of a KV group is query t = r / group of query head kv_head * group + r % group), so the
// query heads of a group share every K/V tile. Key tiles have the mma.sync kernel's 64 keys (one split plan serves
// both). head_dim 256 only; head_dim 512 runs the mma.sync kernel.
constexpr int kAttentionWgmmaThreads = 256;
constexpr int kAttentionWgmmaBlockM = 128;  // packed query rows per CTA
constexpr int kAttentionWgmmaBlockN = 64;
constexpr bool attention_wgmma_supported(int head_dim) { return head_dim == 256; }

}  // namespace dgemma::kernels
