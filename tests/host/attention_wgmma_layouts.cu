// Host-side checks of the register and shared-memory layouts the wgmma attention kernel (sm90_attention_wgmma.cuh)
// builds by hand on top of CuTe: pure layout arithmetic, so they run without a GPU. Prints "ok" or the first
// violation, and exits non-zero on any. Built and run by tests/test_attention_wgmma_layouts.py.
// The deep-pipeline variant's 48-key tiles use one of CuTe's extended wgmma shapes (as its translation unit does).
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "kernels/sm90_attention_wgmma.cuh"

using namespace cute;
namespace wg = dgemma::kernels::attention_wgmma_detail;

static int failures = 0;
#define EXPECT(cond, ...)                     \
  do {                                        \
    if (!(cond)) {                            \
      if (failures++ < 10) {                  \
        std::printf("FAIL %s: ", #cond);      \
        std::printf(__VA_ARGS__);             \
        std::printf("\n");                    \
      }                                       \
    }                                         \
  } while (0)

// The rows/columns view of S: every register of view row r holds the same S row, every register of view column c the
// same S column; a quad (lanes 4i..4i+3 of a warp) holds all 64 columns of its rows, and the rows of O are S's rows.
template <class Cfg>
static void check_accumulator_views() {
  constexpr int kN = Cfg::kBlockN;
  typename Cfg::MmaQK mma_qk;
  typename Cfg::MmaPV mma_pv;
  std::vector<std::set<int>> quad_cols(128 / 4 * 2);
  for (int t = 0; t < 128; ++t) {
    auto thr_qk = mma_qk.get_thread_slice(t);
    auto thr_pv = mma_pv.get_thread_slice(t);
    Tensor cs = thr_qk.partition_C(make_identity_tensor(Shape<_64, Int<kN>>{}));
    Tensor co = thr_pv.partition_C(make_identity_tensor(Shape<_64, _256>{}));
    Tensor cs_rc = make_tensor(cs.data(), wg::rowcol(cs.layout()));
    Tensor co_rc = make_tensor(co.data(), wg::rowcol(co.layout()));
    EXPECT(size<0>(cs_rc) == 2 && size<1>(cs_rc) == kN / 4 && size<0>(co_rc) == 2 && size<1>(co_rc) == 64,
           "thread %d: views of %d x %d and %d x %d", t, int(size<0>(cs_rc)), int(size<1>(cs_rc)), int(size<0>(co_rc)),
           int(size<1>(co_rc)));
    for (int r = 0; r < 2; ++r) {
      const int row = get<0>(cs_rc(r, 0));
      EXPECT(row / 16 == t / 32 && row % 8 == (t % 32) / 4, "thread %d holds S row %d", t, row);
      for (int c = 0; c < size<1>(cs_rc); ++c) {
        EXPECT(get<0>(cs_rc(r, c)) == row, "thread %d S view (%d, %d) is row %d, not %d", t, r, c,
               int(get<0>(cs_rc(r, c))), row);
        EXPECT(get<1>(cs_rc(r, c)) == get<1>(cs_rc(0, c)), "thread %d S view column %d differs between rows", t, c);
        quad_cols[(t / 4) * 2 + r].insert(get<1>(cs_rc(r, c)));
      }
      for (int c = 0; c < size<1>(co_rc); ++c) {
        EXPECT(get<0>(co_rc(r, c)) == row, "thread %d O view (%d, %d) is row %d, not S's %d", t, r, c,
               int(get<0>(co_rc(r, c))), row);
        if (c % 2 == 0)
          EXPECT(get<1>(co_rc(r, c + 1)) == get<1>(co_rc(r, c)) + 1 && get<1>(co_rc(r, c)) % 2 == 0,
                 "thread %d O columns %d, %d are not an aligned pair", t, c, c + 1);
      }
    }
  }
  for (size_t i = 0; i < quad_cols.size(); ++i)
    EXPECT(int(quad_cols[i].size()) == kN, "quad row %zu covers %zu columns", i, quad_cols[i].size());
}

// P = the S accumulator rounded to bf16, read as the A operand of the m64n256k16 register-sourced wgmmas: value v of
// k-block kb of thread t must be the S element the A fragment layout of the atom puts there.
template <class Cfg>
static void check_p_as_a_operand() {
  constexpr int kN = Cfg::kBlockN;
  typename Cfg::MmaQK mma_qk;
  using ALayout = typename Cfg::MmaPV::Atom::Traits::ALayout;  // (thread, value) -> m + 64 k in the 64 x 16 tile
  Tensor rP = make_tensor<wg::bf16>(partition_fragment_C(mma_qk, Shape<_64, Int<kN>>{}).layout());
  auto a_layout = wg::acc_as_a_operand(rP.layout());
  EXPECT(size<0>(a_layout) == 8 && size<2>(a_layout) == kN / 16, "A operand view of %d values x %d k-blocks",
         int(size<0>(a_layout)), int(size<2>(a_layout)));
  // The accumulator's registers in index order (so register index i is the i-th element of the identity partition).
  for (int i = 0; i < size(rP); ++i)
    EXPECT(rP.layout()(i) == i, "accumulator element %d at register %d", i, int(rP.layout()(i)));
  for (int t = 0; t < 128; ++t) {
    Tensor cs = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<kN>>{}));
    for (int kb = 0; kb < kN / 16; ++kb) {
      for (int v = 0; v < 8; ++v) {
        const int reg = a_layout(v, 0, kb);  // register index within the accumulator
        const int want = ALayout{}(t, v);
        const int m = want % 64, k = want / 64 + 16 * kb;
        EXPECT(get<0>(cs(reg)) == m && get<1>(cs(reg)) == k,
               "thread %d k-block %d value %d: register %d holds S(%d, %d), "
               "the A operand wants S(%d, %d)", t, kb, v, reg, int(get<0>(cs(reg))), int(get<1>(cs(reg))), m, k);
      }
      // Two consecutive values make one 32-bit A register.
      for (int v = 0; v < 8; v += 2) EXPECT(a_layout(v + 1, 0, kb) == a_layout(v, 0, kb) + 1, "value pair %d split", v);
    }
  }
}

// The cp.async destinations: 16-byte chunks of 8 consecutive head-dim elements stay contiguous and aligned, and the
// chunks of a tile fill the buffer without overlap.
template <class Tile, class Index>
static void check_chunks(const char* name, Tile tile, int rows, int dim, int stages, Index at) {
  std::set<long> seen;
  for (int s = 0; s < stages; ++s)
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < dim / 8; ++c) {
        const wg::bf16* first = at(tile, r, 8 * c, s);
        const long off = long(first - at(tile, 0, 0, 0));
        EXPECT(off % 8 == 0, "%s (%d, %d, %d): chunk at element %ld", name, r, 8 * c, s, off);
        for (int j = 1; j < 8; ++j)
          EXPECT(at(tile, r, 8 * c + j, s) == first + j, "%s (%d, %d, %d): element %d not contiguous", name, r, 8 * c,
                 s, j);
        EXPECT(seen.insert(off).second, "%s (%d, %d, %d): chunk %ld written twice", name, r, 8 * c, s, off);
        EXPECT(off >= 0 && off + 8 <= long(cosize(tile.layout())), "%s chunk %ld outside the tile", name, off);
      }
  EXPECT(long(seen.size()) * 8 == long(rows) * dim * stages, "%s: %zu chunks", name, seen.size());
}

template <class Cfg>
static void check_shared_tiles() {
  static typename Cfg::Smem smem;  // static storage: aligned as declared (1024 bytes)
  constexpr int kN = Cfg::kBlockN, kTiles = Cfg::kHalves * Cfg::kStages;
  EXPECT(reinterpret_cast<uintptr_t>(&smem) % 1024 == 0, "shared storage alignment");
  Tensor sQ = make_tensor(make_smem_ptr(smem.q), typename Cfg::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k), typename Cfg::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v), typename Cfg::SmemLayoutVt{});
  check_chunks("Q", sQ, 64, 256, 2, [](auto& t, int r, int d, int s) { return &t(r, d, s); });
  check_chunks("K", sK, kN, 256, kTiles, [](auto& t, int r, int d, int s) { return &t(r, d, s); });
  check_chunks("Vt", sVt, kN, 256, kTiles, [](auto& t, int r, int d, int s) { return &t(d, r, s); });
  // The kernel's copies address a thread's rows 8 apart by adding one distance per operand: rows 8 apart must have
  // their chunks at one fixed distance, whatever the row, column and stage.
  const long k8 = long(&sK(8, 0, 0) - &sK(0, 0, 0)), v8 = long(&sVt(0, 8, 0) - &sVt(0, 0, 0));
  for (int s = 0; s < kTiles; ++s)
    for (int r = 0; r + 8 < kN; ++r)
      for (int c = 0; c < 256; c += 8) {
        EXPECT(long(&sK(r + 8, c, s) - &sK(r, c, s)) == k8, "K (%d, %d, %d): rows 8 apart not %ld apart", r, c, s, k8);
        EXPECT(long(&sVt(c, r + 8, s) - &sVt(c, r, s)) == v8, "Vt (%d, %d, %d): rows 8 apart not %ld apart", c, r, s,
               v8);
      }
  // Every operand tile (the unit one wgmma descriptor addresses) starts 1024-byte aligned.
  for (int s = 0; s < 2; ++s)
    EXPECT(reinterpret_cast<uintptr_t>(&sQ(0, 0, s)) % 1024 == 0, "Q tile %d alignment", s);
  for (int s = 0; s < kTiles; ++s)
    EXPECT(reinterpret_cast<uintptr_t>(&sK(0, 0, s)) % 1024 == 0 &&
               reinterpret_cast<uintptr_t>(&sVt(0, 0, s)) % 1024 == 0,
           "K/V tile %d alignment", s);
  EXPECT(sizeof(typename Cfg::Smem) + 1024 == Cfg::kSmemBytes && Cfg::kSmemBytes <= 227 * 1024,
         "shared memory %zu bytes", Cfg::kSmemBytes);
}

template <int D, bool kDeep = false>
static void check_config() {
  using Cfg = wg::Config<D, kDeep>;
  const int before = failures;
  check_accumulator_views<Cfg>();
  check_p_as_a_operand<Cfg>();
  check_shared_tiles<Cfg>();
  if (failures > before) std::printf("head_dim %d%s: %d failures\n", D, kDeep ? " (deep)" : "", failures - before);
}

int main() {
  check_config<256>();
  check_config<512>();
  check_config<256, true>();  // 48-key tiles, three stages
  static_assert(wg::Config<256, true>::kBlockN == 48 && wg::Config<256, true>::kStages == 3, "the deep variant");
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
