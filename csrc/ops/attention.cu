#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/sm90_attention_bf16.cuh"
#include "kernels/sm90_attention_wgmma.cuh"
#include "ops/attention.h"
#include "ops/attention_checks.h"

namespace dgemma {

namespace kernels {
// Instantiated one per file (attention_sm90_d{256,512}.cu, attention_sm90_wgmma_d{256,512}.cu,
// attention_sm90_wgmma_deep_d256.cu) so builds parallelise.
extern template cudaError_t attention_bf16<256>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_bf16<512>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_wgmma<256>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_wgmma<512>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_wgmma<256, true>(const AttentionParams&, cudaStream_t);
}  // namespace kernels

using namespace attention_checks;

namespace {
// The wgmma kernel's ping-pong between its warpgroups at head_dim 256: DGEMMA_ATTENTION_PINGPONG=1 (the default) or
// 0, read once, for the A/B on a GPU; anything else is refused by every call.
bool attention_wgmma_pingpong() {
  static const std::string raw = [] {
    const char* v = std::getenv("DGEMMA_ATTENTION_PINGPONG");
    return std::string(v == nullptr ? "" : v);
  }();
  if (raw.empty() || raw == "1") return true;
  if (raw == "0") return false;
  ::dgemma::throw_invalid("DGEMMA_ATTENTION_PINGPONG=" + raw.substr(0, 80) + " is not 0 or 1");
}

// The mma.sync kernel's key pipeline: DGEMMA_ATTENTION_STAGES=2 (the default: each key tile requested one tile before
// it is multiplied) or 3 (two tiles before), read once, for the A/B on a GPU (the same results bit for bit); anything
// else is refused by every call.
int attention_mma_sync_stages() {
  static const std::string raw = [] {
    const char* v = std::getenv("DGEMMA_ATTENTION_STAGES");
    return std::string(v == nullptr ? "" : v);
  }();
  if (raw.empty() || raw == "2") return 2;
  if (raw == "3") return 3;
  ::dgemma::throw_invalid("DGEMMA_ATTENTION_STAGES=" + raw.substr(0, 80) + " is not 2 or 3");
}
}  // namespace

void attention_forward(const TensorArg& q, const TensorArg& cache_k, const TensorArg& cache_v,
                       const TensorArg& tail_k, const TensorArg& tail_v, const TensorArg& prefix_lens,
                       const TensorArg* valid, const TensorArg& out, const TensorArg* part_o,
                       const TensorArg* part_lse, const TensorArg* split_counters, const AttentionOptions& opt,
                       std::uintptr_t stream) {
  check_cuda(q);
  const int dev = q.device;
  check_bf16_rows(q, 4, dev);
  const int64_t b = q.shape[0], hq = q.shape[1], t = q.shape[2], d = q.shape[3];
  if (!kernels::attention_head_dim_supported(static_cast<int>(d)))
    ::dgemma::throw_invalid("q head_dim " + std::to_string(d) + " is not supported (expected 256 or 512)");
  const auto [block_m, block_n] = attention_tile_shape(d, opt.impl);
  check_bf16_rows(cache_k, 4, dev);
  check_bf16_rows(cache_v, 4, dev);
  const int64_t hkv = cache_k.shape[1], slots = cache_k.shape[2];
  check_shape(cache_k, {b, hkv, slots, d});
  check_shape(cache_v, {b, hkv, slots, d});
  if (hkv <= 0 || hq % hkv != 0)
    ::dgemma::throw_invalid("q heads " + std::to_string(hq) + " must be a multiple of the KV heads " +
                                std::to_string(hkv) + " (cache_k dimension 1)");
  check_bf16_rows(tail_k, 4, dev);
  check_bf16_rows(tail_v, 4, dev);
  check_shape(tail_k, {b, hkv, t, d});
  check_shape(tail_v, {b, hkv, t, d});
  check_bf16_rows(out, 4, dev);
  check_shape(out, {b, t, hq, d});
  check_vector(prefix_lens, DType::kInt32, b, "batch", q);
  // The kernels advance a thread's key pointers by 8 rows at a time in 32-bit element offsets (KeyRowWalk).
  check_range("cache_k slot stride", cache_k.strides[2], 0, (int64_t(1) << 28) - 1);
  check_range("cache_v slot stride", cache_v.strides[2], 0, (int64_t(1) << 28) - 1);
  check_range("tail_k token stride", tail_k.strides[2], 0, (int64_t(1) << 28) - 1);
  check_range("tail_v token stride", tail_v.strides[2], 0, (int64_t(1) << 28) - 1);

  check_range("batch", b, 1, 65535);
  check_range("q heads", hq, 1, 65535);
  check_range("queries (T)", t, 1, 1 << 24);
  check_range("window", opt.window, 0, 1 << 30);
  check_range("ring_size", opt.ring_size, 0, slots);
  check_range("max_prefix", opt.max_prefix, 0, (1 << 30) - t);
  const int64_t visible = opt.window > 0 ? std::min(opt.max_prefix, opt.window - 1) : opt.max_prefix;
  if (opt.ring_size > 0 && visible > opt.ring_size)
    ::dgemma::throw_invalid("the ring of " + std::to_string(opt.ring_size) + " slots cannot hold the " +
                                std::to_string(visible) + " visible prefix positions (window " +
                                std::to_string(opt.window) + ", max_prefix " + std::to_string(opt.max_prefix) + ")");
  if (opt.ring_size == 0 && opt.max_prefix > slots)
    ::dgemma::throw_invalid("max_prefix " + std::to_string(opt.max_prefix) + " exceeds the cache's " +
                                std::to_string(slots) + " slots (cache_k dimension 2)");
  if (valid != nullptr) {
    check_cuda(*valid);
    check_same_device(q, *valid);
    if (valid->dtype != DType::kBool && valid->dtype != DType::kUInt8)
      ::dgemma::throw_invalid(valid->name + " has dtype " + dtype_name(valid->dtype) + ", expected bool or uint8");
    check_ndim(*valid, 2);
    check_dim(*valid, 0, b, "batch");
    const int64_t need = opt.max_prefix + (opt.valid_tail ? t : 0);
    if (valid->shape[1] < need)
      ::dgemma::throw_invalid(valid->name + " has " + std::to_string(valid->shape[1]) +
                                  " positions, expected at least " + std::to_string(need));
    if (valid->strides[1] != 1 && valid->shape[1] > 1)
      ::dgemma::throw_invalid(valid->name + " must be contiguous in its last dimension");
  }

  // The wgmma kernel's CTAs take block_m of the group x T packed query rows (int32 indices in the kernel).
  const bool wgmma = attention_is_wgmma(opt.impl);
  const int64_t rows = wgmma ? hq / hkv * t : t;
  if (wgmma) check_range("query heads per KV head x queries", rows, 1, (int64_t(1) << 31) - 256);
  check_range("num_splits", opt.num_splits, 1, 65535 / b);
  check_range("split_tiles", opt.split_tiles, 1, 1 << 30);
  const int64_t key_tiles = (visible + t + block_n - 1) / block_n;
  if (opt.num_splits * opt.split_tiles < key_tiles)
    ::dgemma::throw_invalid("num_splits " + std::to_string(opt.num_splits) + " x split_tiles " +
                                std::to_string(opt.split_tiles) + " does not cover the " + std::to_string(key_tiles) +
                                " key tiles of " + std::to_string(block_n) + " keys (see dgemma.attention_plan)");
  if (opt.num_splits > 1) {
    if (part_o == nullptr || part_lse == nullptr || split_counters == nullptr)
      ::dgemma::throw_invalid("num_splits > 1 needs the part_o, part_lse and split_counters workspaces");
    for (const TensorArg* w : {part_o, part_lse, split_counters}) {
      check_cuda(*w);
      check_same_device(q, *w);
      check_dtype(*w, w == split_counters ? DType::kInt32 : DType::kFloat32);
      check_contiguous(*w);
    }
    check_shape(*part_o, {opt.num_splits, b, hq, t, d});
    check_shape(*part_lse, {opt.num_splits, b, hq, t});
    check_shape(*split_counters, {b, wgmma ? hkv : hq, (rows + block_m - 1) / block_m});
  }

  kernels::AttentionParams p{};
  p.q = static_cast<const __nv_bfloat16*>(q.data);
  p.q_sb = q.strides[0], p.q_sh = q.strides[1], p.q_st = q.strides[2];
  p.cache_k = static_cast<const __nv_bfloat16*>(cache_k.data);
  p.cache_v = static_cast<const __nv_bfloat16*>(cache_v.data);
  p.ck_sb = cache_k.strides[0], p.ck_sh = cache_k.strides[1], p.ck_ss = cache_k.strides[2];
  p.cv_sb = cache_v.strides[0], p.cv_sh = cache_v.strides[1], p.cv_ss = cache_v.strides[2];
  p.tail_k = static_cast<const __nv_bfloat16*>(tail_k.data);
  p.tail_v = static_cast<const __nv_bfloat16*>(tail_v.data);
  p.tk_sb = tail_k.strides[0], p.tk_sh = tail_k.strides[1], p.tk_st = tail_k.strides[2];
  p.tv_sb = tail_v.strides[0], p.tv_sh = tail_v.strides[1], p.tv_st = tail_v.strides[2];
  p.prefix_lens = static_cast<const int32_t*>(prefix_lens.data);
  p.valid = valid ? static_cast<const uint8_t*>(valid->data) : nullptr;
  p.valid_sb = valid ? valid->strides[0] : 0;
  p.out = static_cast<__nv_bfloat16*>(out.data);
  p.o_sb = out.strides[0], p.o_st = out.strides[1], p.o_sh = out.strides[2];
  p.part_o = opt.num_splits > 1 ? static_cast<float*>(part_o->data) : nullptr;
  p.part_lse = opt.num_splits > 1 ? static_cast<float*>(part_lse->data) : nullptr;
  p.split_counters = opt.num_splits > 1 ? static_cast<int*>(split_counters->data) : nullptr;
  p.batch = static_cast<int>(b), p.hq = static_cast<int>(hq), p.hkv = static_cast<int>(hkv);
  p.t = static_cast<int>(t);
  p.max_prefix = static_cast<int>(opt.max_prefix);
  p.ring_size = static_cast<int>(opt.ring_size);
  p.window = static_cast<int>(opt.window);
  p.causal = opt.causal ? 1 : 0;
  p.valid_tail = opt.valid_tail ? 1 : 0;
  p.num_splits = static_cast<int>(opt.num_splits);
  p.split_tiles = static_cast<int>(std::min<int64_t>(opt.split_tiles, 1 << 30));
  p.wgmma_pingpong = wgmma && attention_wgmma_pingpong() ? 1 : 0;
  p.stages = attention_mma_sync_stages();  // read (and checked) on every call, whichever kernel runs

  throw_if_failed(cudaSetDevice(dev), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (d == 512)
    err = wgmma ? kernels::attention_wgmma<512>(p, s) : kernels::attention_bf16<512>(p, s);
  else if (opt.impl == kAttentionWgmmaDeep)
    err = kernels::attention_wgmma<256, true>(p, s);
  else
    err = wgmma ? kernels::attention_wgmma<256>(p, s) : kernels::attention_bf16<256>(p, s);
  throw_if_failed(err, "attention launch");
}

}  // namespace dgemma
