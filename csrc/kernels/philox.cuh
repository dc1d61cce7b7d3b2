// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator, so every random number is a pure function of (key, counter) and results do not depend
// on tiling, launch order or thread count. Usable from host and device code; torch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DGEMMA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DGEMMA_HOST_DEVICE inline
#endif

namespace dgemma::kernels {

struct Philox4x32 {
  uint32_t v[4];
};

DGEMMA_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Ten rounds; the key is bumped by the Weyl constants between rounds (not after the last).
DGEMMA_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// NOTE: the dgemma sampler stream (python/dgemma/vocab_head.py mirrors it bit for bit):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (word_index, position in the canvas, step, sequence << 2 | purpose)
// purpose kSampleStream: word_index = vocab id >> 2, output word (vocab id & 3) feeds the Gumbel noise
// of that vocab id; purpose kRedrawStream: word_index = 0, output word 0 picks the uniform re-draw.
constexpr uint32_t kSampleStream = 0;
constexpr uint32_t kRedrawStream = 1;

DGEMMA_HOST_DEVICE uint32_t philox_stream_word3(uint32_t sequence, uint32_t purpose) {
  return (sequence << 2) | purpose;
}

// A uniform in the open interval (0, 1) from the top 23 bits: (2k + 1) / 2^24 is exact in fp32, so
// the host reference and the kernel see the same value; the extremes are 2^-24 and 1 - 2^-24.
DGEMMA_HOST_DEVICE float philox_open_uniform(uint32_t word) {
  return static_cast<float>(((word >> 9) << 1) | 1u) * 5.9604644775390625e-8f;  // 2^-24
}

// A uniform integer in [0, n) (multiply-shift; the bias is at most n / 2^32, zero when n is a power of 2).
DGEMMA_HOST_DEVICE uint32_t philox_uniform_below(uint32_t word, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(word) * n) >> 32);
}

}  // namespace dgemma::kernels
