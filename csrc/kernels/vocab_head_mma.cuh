// Tile helpers of the vocabulary-head kernels on top of the shared warp primitives: the XOR swizzle
// of their shared-memory tiles and bf16 pair scaling. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/warp_mma_sm80.cuh"

namespace dgemma::kernels::vocab_head {

// NOTE: tiles whose rows are 64 bf16 (128 bytes, eight 16-byte chunks) store chunk c of row r at chunk
// c ^ (r & 7): the eight row addresses of one ldmatrix 8x8 matrix then fall in eight different bank
// groups, for the plain and the transposed loads alike. Wider rows swizzle the low three chunk bits.
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) { return chunk ^ (row & 7); }

// Multiplies both bf16 halves of a packed pair by s and rounds back to bf16.
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t v, float s) {
  const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xffff0000u);
  return pack_bf16x2(lo * s, hi * s);
}

}  // namespace dgemma::kernels::vocab_head
