// Host-side check of KeyRowWalk (sm90_attention_bf16.cuh), the per-thread walk over the rows of a key tile that both
// attention kernels copy from: for every thread's rows of every tile, in ring and linear caches of many sizes, with
// and without a window, it must name exactly key_source's addresses. Prints "ok" or the first violations and exits
// non-zero on any. Built and run by tests/test_attention_wgmma_layouts.py.
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
          for (int step : {4, 8}) {
            const int block_n = step * 8;  // the kernels copy 8 rows per thread
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
            for (int kv0 = 0; kv0 < kr.n_kv + block_n; kv0 += block_n)
              for (int r0 = 0; r0 < step; ++r0) {
                ad::KeyRowWalk walk(p, kr, kv0 + r0);
                for (int i = 0; i < 8; ++i) {
                  const int kv = kv0 + r0 + i * step;
                  const ad::KeySource want = ad::key_source(p, kr, cache, tail, kv);
                  const ad::KeySource got = walk.next(p, kr, cache, tail, step);
                  ++checked;
                  if ((got.k != want.k || got.v != want.v) && failures++ < 10)
                    std::printf("FAIL ring %d window %d len %d t %d step %d key %d: k %+ld v %+ld, want k %+ld v %+ld\n",
                                ring, window, len, t, step, kv, long(got.k - base), long(got.v - base),
                                long(want.k - base), long(want.v - base));
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
