// Host-side check of KeyRowWalk (sm90_attention_bf16.cuh), the per-thread walk over the key rows both attention kernels
// copy: for every thread's rows of every tile from every first tile a CTA may start at (splits), in ring and linear
// caches of many sizes, with and without a window, it must name exactly key_source's addresses (plus the column).
// Prints "ok" or the first violations and exits non-zero on any. Built and run by
// tests/test_attention_wgmma_layouts.py.
#include <cstdio>
#include <vector>

#include "kernels/sm90_attention_bf16.cuh"

namespace ad = dgemma::kernels::attention_detail;
using dgemma::kernels::AttentionParams;

int main() {
  int failures = 0;
  long checked = 0;
  std::vector<__nv_bfloat16> buf(4 << 20);
  const __nv_bfloat16* base = buf.data();
  for (int ring : {0, 1, 3, 7, 8, 9, 63, 64, 1279})
    for (int window : {0, 4, 5, 10, 1024})
      for (int len : {0, 1, 6, 63, 64, 700, 1500})
        for (int t : {1, 10, 256})
          for (int step : {4, 8})
            for (int rows : {6, 8}) {  // rows per thread per tile: 8, or 6 (the deep variant's 48-key tiles)
              const int block_n = step * rows;
              AttentionParams p{};
              int32_t lens[1] = {len};
              p.prefix_lens = lens;
              p.max_prefix = len;
              p.window = window;
              p.t = t;
              const int visible = window > 0 && window - 1 < len ? window - 1 : len;
              if (ring > 0 && visible > ring) continue;  // the launcher refuses a ring that cannot hold the prefix
              p.ring_size = ring;
              p.ck_ss = 256;
              p.cv_ss = 256;
              p.tk_st = 512;
              p.tv_st = 768;
              p.tail_k = base + (3 << 20);
              p.tail_v = base + (3 << 20) + 7;
              const ad::KeyRange kr = ad::key_range(p, 0);
              const ad::KeySource cache{base, base + (1 << 20)};
              const ad::KeySource tail{base + (2 << 20), base + (2 << 20) + 256};
              // A CTA copies consecutive tiles from its first (split) tile on; each thread walks its rows of all of
              // them, at column offset col.
              const int tiles = (kr.n_kv + block_n - 1) / block_n + 1;
              for (int first : {0, 1, 2, tiles / 2, tiles - 2, tiles - 1}) {
                if (first < 0) continue;
                for (int r0 = 0; r0 < step; ++r0) {
                  const int col = 8 * (r0 % 3);
                  ad::KeyRowWalk walk(p, kr, cache, tail, first * block_n + r0, step, col);
                  for (int kv = first * block_n + r0; kv < tiles * block_n; kv += step) {
                    ad::KeySource want = ad::key_source(p, kr, cache, tail, kv);
                    want.k += col;
                    want.v += col;
                    const ad::KeySource got = walk.next(p, kr, cache, tail, step, col);
                    ++checked;
                    if ((got.k != want.k || got.v != want.v) && failures++ < 10)
                      std::printf("FAIL ring %d window %d len %d t %d step %d tile %d keys, first tile %d key %d: "
                                  "k %+ld v %+ld, want k %+ld v %+ld\n",
                                  ring, window, len, t, step, block_n, first, kv, long(got.k - base),
                                  long(got.v - base), long(want.k - base), long(want.v - base));
                  }
                }
              }
            }
  if (failures) {
    std::printf("%d of %ld rows named other addresses\n", failures, checked);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
